"""KFP component for :func:`keel.serve.control.deploy_champion` and :func:`~keel.serve.control.deploy_shadow`."""

from kfp import dsl

from keel.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def deploy(model_version_uri: str, config: str, run_name: str, job_id: str, port: int = 8000,
           shadow: bool = False) -> str:
    """Serve the newly promoted champion, or (``shadow``) a version awaiting approval as the champion's
    shadow (the cluster's RayService, or Ray Serve here); returns the serving URL ("" if nothing to shadow)."""
    from keel.runs import open_stage

    with open_stage("deploy", run_name, job_id, config) as run:
        from keel.serve.control import deploy_champion, deploy_shadow

        url = deploy_shadow(model_version_uri, run.settings) if shadow else deploy_champion(
            model_version_uri, port, run.settings)
    return url or ""
