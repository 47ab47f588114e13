"""KFP component for :func:`keel.serve.control.deploy_detached`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def deploy(model_version_uri: str, config: str, run_name: str, job_id: str, port: int = 8000) -> str:
    """Serve the newly promoted champion on Ray Serve; returns the URL it answers on."""
    from keel.runs import open_stage

    with open_stage("deploy", run_name, job_id, config) as run:
        from keel.serve.control import deploy_detached
        from keel.serve.deployment import ServeConfig

        host = "0.0.0.0" if run.settings.serve_dashboard_url else "127.0.0.1"  # a cluster's Serve pods vs this machine
        url = deploy_detached(model_version_uri, ServeConfig(port=port, host=host), run.settings)
    return url
