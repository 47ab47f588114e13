"""KFP component for :func:`keel.recommend.data.prepare`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def interactions(source: str, config: str, run_name: str, job_id: str) -> str:
    """Generate or read the interactions and hold out each user's latest ones; returns the splits' URI."""
    from keel.runs import open_stage

    with open_stage("ingest", run_name, job_id, config) as run:
        from keel.recommend.data import prepare

        prepare(source, run.config.interactions, run.config.split, run.output_uri, run.settings)
    return run.output_uri
