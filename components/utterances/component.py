"""KFP component for :func:`keel.intents.prepare.prepare_utterances`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def utterances(source: str, config: str, run_name: str, job_id: str) -> str:
    """Generate or read utterances, replace personal data, split and tokenize; returns the splits' URI."""
    from keel.runs import open_stage

    with open_stage("ingest", run_name, job_id, config) as run:
        from keel.intents.prepare import prepare_utterances

        prepare_utterances(source, run.config.utterances, run.output_uri, run.settings)
    return run.output_uri
