"""KFP component for :func:`keel.serve.control.deploy_champion` and
:func:`~keel.serve.control.deploy_awaiting_approval`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def deploy(model_version_uri: str, config: str, run_name: str, job_id: str, port: int = 8000,
           awaiting_approval: bool = False) -> str:
    """Serve the newly promoted champion, or a version awaiting approval as the champion's shadow or canary
    (``registry.preview``; the cluster's RayService, or Ray Serve here); returns the serving URL ("" if no
    champion serves the model to share its traffic)."""
    from keel.runs import open_stage

    with open_stage("deploy", run_name, job_id, config) as run:
        from keel.serve.control import deploy_awaiting_approval, deploy_champion

        url = deploy_awaiting_approval(model_version_uri, run.config.registry, run.settings) if awaiting_approval \
            else deploy_champion(model_version_uri, port, run.settings)
    return url or ""
