"""``keel pipelines``: compile pipelines to KFP IR YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from keel.errors import ConfigError

app = typer.Typer(help="Compile pipelines to KFP YAML.", no_args_is_help=True)


def compile_all(output_dir: Path, image: str = "") -> list[Path]:
    """Compile every pipeline to ``output_dir/<name>.yaml``, steps on ``image`` (empty: Keel's own); the paths
    written."""
    import pipelines
    from keel.submit import compile_pipeline

    output_dir.mkdir(parents=True, exist_ok=True)
    return [compile_pipeline(pipelines.build(name), output_dir / f"{name}.yaml", image)
            for name in sorted(pipelines.PIPELINES)]


@app.command("compile")
def compile_command(
    output_dir: Path = typer.Option(None, "--output-dir", help="Where to write; default pipelines/compiled/."),
    image: str = typer.Option("", "--image", help="Image the steps run (REGISTRY/PATH:TAG, from `make image "
                                                  "IMAGE=...`); default KEEL_IMAGE, else Keel's own."),
) -> None:
    """Compile every pipeline into KFP IR YAML (what Kubeflow Pipelines uploads)."""
    import pipelines
    from keel.images import chosen_image
    from keel.settings import load_settings

    image = chosen_image(image, load_settings().image)
    if image and output_dir is None:
        raise ConfigError("--image: give --output-dir too; pipelines/compiled/ holds the pipelines on Keel's own "
                          "image, and a test checks it against the code.")
    for path in compile_all(output_dir or pipelines.COMPILED_DIR, image):
        typer.echo(f"wrote {path}")
