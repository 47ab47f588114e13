"""KFP component for :func:`keel.data.validate.validate`."""

from kfp import dsl
from kfp.dsl import HTML, Output

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def validate(dataset_uri: str, config: str, run_name: str, job_id: str, report: Output[HTML]) -> str:
    """Check the dataset against the data contract; the quality report shows in the KFP UI."""
    from keel.runs import open_stage

    with open_stage("validate", run_name, job_id, config) as run:
        from keel.data.validate import REPORT_HTML, validate as run_validate
        from keel.storage import join, read_bytes

        run_validate(dataset_uri, run.config.contract, run.output_uri, run.settings)
        with open(report.path, "wb") as f:
            f.write(read_bytes(join(run.output_uri, REPORT_HTML), run.settings))
    return run.output_uri
