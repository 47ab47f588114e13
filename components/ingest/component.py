"""KFP component for :func:`keel.data.ingest.ingest`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def ingest(source: str, config: str, run_name: str, job_id: str) -> str:
    """Copy a CSV, Parquet or JSONL source into the artifact store as Parquet; returns its URI."""
    from keel.runs import open_stage

    with open_stage("ingest", run_name, job_id, config) as run:
        from keel.data.ingest import ingest as run_ingest

        run_ingest(source, run.output_uri, run.settings)
    return run.output_uri
