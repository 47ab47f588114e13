"""``keel pipelines``: compile pipelines to KFP IR YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from keel.errors import ConfigError

app = typer.Typer(help="Compile pipelines to KFP YAML.", no_args_is_help=True)


def compile_all(output_dir: Path, image: str = "", names: list[str] | None = None,
                config_override: Path | None = None) -> list[Path]:
    """Compile the pipelines ``names`` (default: every one) to ``output_dir/<name>.yaml``, steps on ``image``
    (empty: Keel's own), with ``config_override`` merged over each one's config; the paths written."""
    import pipelines
    from keel.submit import compile_pipeline

    chosen = sorted(names or pipelines.PIPELINES)
    built = {name: pipelines.build(name, config_override) for name in chosen}  # all valid before any is written
    output_dir.mkdir(parents=True, exist_ok=True)
    return [compile_pipeline(pipeline, output_dir / f"{name}.yaml", image) for name, pipeline in built.items()]


@app.command("compile")
def compile_command(
    names: list[str] = typer.Argument(None, help="Pipelines to compile, e.g. medical_diagnosis; default: all."),
    output_dir: Path = typer.Option(None, "--output-dir", help="Where to write; default pipelines/compiled/."),
    image: str = typer.Option("", "--image", help="Image the steps run (REGISTRY/PATH:TAG, from `make image "
                                                  "IMAGE=...`); default KEEL_IMAGE, else Keel's own."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML merged over each named pipeline's config "
                                                             "(e.g. its steps' resources), as `keel submit "
                                                             "--config` does."),
) -> None:
    """Compile pipelines into KFP IR YAML (what Kubeflow Pipelines uploads, or the Kubeflow UI takes)."""
    import pipelines
    from keel.images import chosen_image
    from keel.settings import load_settings

    image = chosen_image(image, load_settings().image)
    for option, given in (("--image", image), ("--config", config)):
        if given and output_dir is None:
            raise ConfigError(f"{option}: give --output-dir too; pipelines/compiled/ holds the pipelines as the "
                              "code defines them (Keel's own image, their own configs), and a test checks it.")
    if config is not None and not names:
        raise ConfigError("--config: name the pipelines it is for (each kind has its own sections), e.g. "
                          "`keel pipelines compile medical_diagnosis --config my.yaml --output-dir out/`.")
    for path in compile_all(output_dir or pipelines.COMPILED_DIR, image, names, config):
        typer.echo(f"wrote {path}")
