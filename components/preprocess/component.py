"""KFP component for :func:`keel.data.preprocess.preprocess`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def preprocess(dataset_uri: str, config: str, run_name: str, job_id: str) -> str:
    """De-duplicate, split with stratification and fit the feature transform; returns the splits' URI."""
    from keel.runs import open_stage

    with open_stage("preprocess", run_name, job_id, config) as run:
        from keel.data.preprocess import preprocess as run_preprocess

        run_preprocess(dataset_uri, run.config.contract, run.config.preprocess, run.output_uri, run.settings)
    return run.output_uri
