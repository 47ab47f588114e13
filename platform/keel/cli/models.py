"""``keel models``: what the MLflow registry holds, and moving its champion by hand."""

from __future__ import annotations

import time
from typing import Any

import typer

from keel.cli.output import OUTPUT_OPTION, OutputFormat, print_json, print_table
from keel.settings import load_settings

app = typer.Typer(help="Inspect registered models and where a version came from; move the champion by hand "
                       "(approve, roll back) or reject a version.", no_args_is_help=True)
# The classifiers' headline metrics, then the recommenders' at their own k (each model has one set or the other)
# (column: metric name, or the prefix of a recommender's test_ndcg_at_10, test_ndcg_at_5, ...)
KEY_METRICS = {"test_accuracy": "test_accuracy", "test_f1_macro": "test_f1_macro", "test_roc_auc": "test_roc_auc",
               "test_ndcg@k": "test_ndcg_at_", "test_recall@k": "test_recall_at_"}


def list_models(page_size: int = 100) -> list[dict[str, Any]]:
    """Every registered model version with its aliases and test metrics, newest first (all of them: the
    registry answers a page of ``page_size`` at a time)."""
    from keel import tracking

    client = tracking.mlflow_client(load_settings())
    rows = []
    for model in tracking.every_page(client.search_registered_models, max_results=page_size):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in tracking.every_page(client.search_model_versions, filter_string=f"name='{model.name}'",
                                           max_results=page_size):
            rows.append({"name": model.name, "version": int(version.version),
                         "aliases": sorted(aliases.get(str(version.version), [])),
                         "awaiting_approval": version.tags.get(tracking.AWAITING_APPROVAL) == "true",
                         "rejected": version.tags.get(tracking.REJECTED),  # the reason, when a person rejected it
                         "deploy_failed": version.tags.get(tracking.DEPLOY_FAILED),  # why the deploy step failed
                         "performance": version.tags.get(tracking.PERFORMANCE),  # the latest check on labels
                         "run_id": version.run_id, "created": version.creation_timestamp})
    metrics = metrics_of_runs(client, sorted({row["run_id"] for row in rows if row["run_id"]}), page_size)
    for row in rows:
        row["metrics"] = {name: value for name, value in metrics.get(row["run_id"], {}).items()
                          if name.startswith(tuple(KEY_METRICS.values()))}
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def metrics_of_runs(client: Any, run_ids: list[str], page_size: int) -> dict[str, dict[str, float]]:
    """Each run's latest metrics, fetched ``page_size`` runs a query: a ``get_run`` per version took a round
    trip each to a remote tracking server. A run that is gone (deleted for good) has none."""
    from mlflow.entities import ViewType

    from keel import tracking

    if not run_ids:
        return {}
    experiments = tracking.experiment_ids(client, deleted_too=True, page_size=page_size)
    found: dict[str, dict[str, float]] = {}
    for start in range(0, len(run_ids), page_size):
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids[start:start + page_size])
        for run in tracking.every_page(client.search_runs, experiment_ids=experiments,
                                       filter_string=f"attributes.run_id IN ({quoted})",
                                       run_view_type=ViewType.ALL, max_results=page_size):
            found[run.info.run_id] = dict(run.data.metrics)
    return found


@app.command("list")
def list_command(output: OutputFormat = OUTPUT_OPTION) -> None:
    """List registered models with versions, aliases and key metrics."""
    rows = list_models()
    if output is OutputFormat.json:
        print_json(rows)
        return
    if not rows:
        from keel import tracking

        settings = load_settings()
        typer.echo(f"No registered models yet at {settings.mlflow_tracking_uri}: run `keel run medical_diagnosis` "
                   f"first. {tracking.local_store_hint(settings)}".rstrip())
        return
    print_table(["name", "version", "aliases", *KEY_METRICS, "on labels"],
                [[r["name"], r["version"], ",".join(r["aliases"] + _states(r)) or "-",
                  *(shown_key_metric(r["metrics"], k) for k in KEY_METRICS.values()),
                  r["performance"].split(":")[0] if r["performance"] else "-"] for r in rows])


def _states(row: dict[str, Any]) -> list[str]:
    """What the registry's tags say of a version, beside its aliases."""
    return [state for state, tagged in (("awaiting approval", row["awaiting_approval"]), ("rejected", row["rejected"]),
                                        ("deploy failed", row["deploy_failed"])) if tagged]


def shown_key_metric(metrics: dict[str, float], key: str) -> str:
    """A version's value for ``key`` (a prefix: a recommender's at whichever k it was evaluated at), or a dash."""
    found = [value for name, value in metrics.items() if name == key or key.endswith("_") and name.startswith(key)]
    return f"{found[0]:.4f}" if found else "-"


def model_and_version(model: str, version: str | None, default: str | None = None) -> tuple[str, str]:
    """The model as a person types it, NAME with VERSION apart, or as Keel prints it, one reference:
    ``models:/NAME/N`` or ``models:/NAME@ALIAS`` (``keel run``'s summary), or the same without ``models:/``."""
    from keel.errors import ConfigError
    from keel.tracking import split_model_reference

    name, separator, embedded = split_model_reference(model.removeprefix("models:/"))
    if not name or (separator and not embedded):
        raise ConfigError(f"{model!r}: expected a model name (medical-diagnosis) or a reference to one version "
                          "(medical-diagnosis/3, medical-diagnosis@champion, models:/medical-diagnosis/3).")
    if embedded and version is not None and version != embedded:
        raise ConfigError(f"{model!r} names version {embedded!r} already, and the version argument {version!r}: "
                          "give the version once.")
    chosen = embedded or version or default
    if chosen is None:
        raise ConfigError(f"{name}: which version? Give it after the name ({name} 3) or in it ({name}/3).")
    return name, chosen


def model_name_only(model: str) -> str:
    """``compare`` takes the two versions apart from the name: ``models:/NAME`` is a name too."""
    from keel.errors import ConfigError

    name = model.removeprefix("models:/")
    if "/" in name or "@" in name:
        raise ConfigError(f"{model!r}: compare takes the model's name, then its two versions "
                          f"(`keel models compare {name.split('@')[0].split('/')[0]} 1 2`).")
    return name


MODEL_HELP = ("The registered model, e.g. medical-diagnosis, or one version of it as `keel run` prints it: "
              "models:/medical-diagnosis/3, medical-diagnosis@champion.")


@app.command("show")
def show_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    version: str | None = typer.Argument(None, help="A version number, or an alias (champion, challenger). "
                                                    "Default: champion."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """One version's lineage: pipeline run, commit, data, test metrics, the gate's and people's decisions."""
    from keel.lineage import version_lineage
    from keel.tracking import PERFORMANCE

    lineage = version_lineage(*model_and_version(model, version, default="champion"), load_settings())
    if output is OutputFormat.json:
        print_json(lineage)
        return
    aliases = f" ({', '.join(lineage['aliases'])})" if lineage["aliases"] else ""
    typer.echo(f"{lineage['model_uri']}{aliases}, {lineage['status']}, registered "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(lineage['created_ms'] / 1000))}")
    facts = [("pipeline run", f"{lineage['pipeline_run'] or '-'} ({lineage['pipeline'] or 'no pipeline tag'})"),
             ("MLflow run", lineage["run_url"] or lineage["run_id"] or "-"),
             ("logged model", lineage["logged_model_id"] or "-"),
             ("git commit", lineage["git_commit"] or "-"),
             ("reads", ", ".join(lineage["inputs"]) if lineage["inputs"] is not None else "- (no signature)"),
             *((("predicts", ", ".join(lineage["classes"])),) if lineage["classes"] else ()),
             *(("trained on", f"{d['source']} (digest {d['digest']})") for d in lineage["datasets"]),
             *_variant_facts(lineage),
             *_promotion_facts(lineage),
             *(("on labels" if key == PERFORMANCE else key.removeprefix("keel.").replace("_", " "), value)
               for key, value in lineage["decisions"].items())]
    for label, value in facts:
        typer.echo(f"  {label + ':' if label else '':<22} {value}")  # no label: the line above goes on
    if lineage["test_metrics"]:
        print_table(["test metric", "value"], [[k, f"{v:.4f}"] for k, v in lineage["test_metrics"].items()])
    typer.echo(f"Config: {len(lineage['params'])} params on the run (`--output json` lists them).")


def _variant_facts(lineage: dict[str, Any]) -> list[tuple[str, str]]:
    """Which compressed variant the version is, with the compress stage's words for why it won (why each other
    lost is in the rest of the reason: `--output json`, or the run's tag); none for a run that compressed none."""
    if not lineage["variant"]:
        return []
    won = (lineage["variant_reason"] or "").split("; ")[0]  # "distilled: fastest at batch 1 (...) ..."
    return [("variant", won if won.startswith(f"{lineage['variant']}: ") else lineage["variant"])]


def _promotion_facts(lineage: dict[str, Any]) -> list[tuple[str, str]]:
    """The register step's reason, then each gate check it quotes on a line of its own."""
    from keel.runs import promotion_lines

    if not lineage["promotion_reason"]:
        return [("promotion", f"gate {lineage['gate'] or '-'}")]
    head, *checks = promotion_lines(lineage["promotion_reason"], lineage["promotion_checks"])
    return [("promotion", head), *(("", check) for check in checks)]


@app.command("compare", short_help="Two versions side by side (default: champion and challenger): where each came from, "
                                       "the gate's word, metrics and config; what to read before promoting or rejecting.")
def compare_command(
    model: str = typer.Argument(..., help="The registered model, e.g. medical-diagnosis."),
    first: str = typer.Argument("champion", help="A version number or alias; the baseline."),
    second: str = typer.Argument("challenger", help="A version number or alias; compared with the first."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Two versions side by side (default: champion and challenger): where each came from, the gate's word,
    every test metric with the change, and the config params that differ. What to read before promoting or
    rejecting by hand."""
    from keel.lineage import compare_versions

    compared = compare_versions(model_name_only(model), first, second, load_settings())
    if output is OutputFormat.json:
        print_json(compared)
        return
    sides = [compared["first"], compared["second"]]
    heads = [f"v{side['version']}" + (f" ({', '.join(side['aliases'])})" if side["aliases"] else "") for side in sides]
    rows = [["pipeline run", *(side["pipeline_run"] or "-" for side in sides)],
            ["git commit", *((side["git_commit"] or "-")[:12] for side in sides)],
            ["trained on", *(", ".join(f"{d['name']} {d['digest']}" for d in side["datasets"]) or "-"
                             for side in sides)],
            ["variant", *(side["variant"] or "-" for side in sides)],
            ["gate", *(side["gate"] or "-" for side in sides)]]
    print_table(["", *heads], rows)
    print_table(["test metric", *heads, "change"],
                [[row["metric"], _shown(row["first"]), _shown(row["second"]),
                  "" if row["change"] is None else f"{row['change']:+.4f}"] for row in compared["metrics"]])
    if compared["params_differ"]:
        print_table(["param", *heads], [[row["param"], _shown(row["first"]), _shown(row["second"])]
                                        for row in compared["params_differ"]])
    typer.echo(f"{len(compared['params_differ'])} config params differ, {compared['params_same']} are the same.")
    if compared["inputs_change"]:
        typer.echo(f"Input columns: {heads[1]} {compared['inputs_change']} against {heads[0]}; callers of the served "
                   "model send other fields to one than to the other.")
    if compared["classes_change"]:
        typer.echo(f"Classes: {heads[1]} {compared['classes_change']} against {heads[0]}; callers read other labels "
                   "and probability_<class> fields from one than from the other.")


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command("promote")
def promote_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    version: str | None = typer.Argument(None, help="The version to make champion (an older one to roll back), "
                                                    "unless the model argument names it."),
    reason: str = typer.Option(..., "--reason", help="Why, kept on the model version with who and when."),
    roll: bool = typer.Option(True, "--roll/--no-roll", help="Also serve it wherever the model is served now."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Make a version champion by hand (a rollback, or overriding the gate), and roll what serves the model."""
    from keel.errors import ClusterError
    from keel.registry import promote_by_hand
    from keel.serve.control import ServeError, roll_if_serving

    name, version = model_and_version(model, version)
    settings = load_settings()
    result = promote_by_hand(name, version, reason, settings)
    model_uri = f"models:/{name}/{result['version']}"
    try:
        result["served_at"] = roll_if_serving(name, model_uri, settings) if roll else None
    except (ServeError, ClusterError) as e:
        undo = (f"`keel models promote {name} {result['previous_champion']} --reason ...` moves it back"
                if result["previous_champion"] else "")
        raise type(e)(f"champion is now v{result['version']}, but the served model was not rolled: {e} "
                      f"Retry with this command, or {undo or 'serve it with `keel serve ' + model_uri + '`'}.") from e
    if output is OutputFormat.json:
        print_json(result)
        return
    previous = f"v{result['previous_champion']}" if result["previous_champion"] else "none"
    typer.echo(f"{name}: champion {previous} -> v{result['version']} ({result['reason']})"
               if result["changed"] else f"{name}: v{result['version']} was already champion")
    if result["inputs_change"]:
        typer.echo(f"Input columns: v{result['version']} {result['inputs_change']} against v"
                   f"{result['previous_champion']}; callers of the served model must send its fields.")
    if result["classes_change"]:
        typer.echo(f"Classes: v{result['version']} {result['classes_change']} against v{result['previous_champion']}; "
                   "callers of the served model read its labels and probability_<class> fields.")
    if result["served_at"]:
        typer.echo(f"Serving {model_uri} at {result['served_at']}")
    else:
        why = "--no-roll" if not roll else (f"no RayService, `keel serve --detach` or KEEL_RAY_DASHBOARD_URL head "
                                            f"serves {name}; a foreground `keel serve` is not rolled: restart it")
        typer.echo(f"Serving unchanged ({why}); `keel serve {model_uri}` serves it.")


@app.command("reject")
def reject_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    version: str | None = typer.Argument(None, help="Version to turn down, e.g. 4 (one awaiting approval, say), "
                                                    "unless the model argument names it."),
    reason: str = typer.Option(..., "--reason", help="Why; kept on the model version with who and when."),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Turn a version down, and withdraw it where it serves as the champion's shadow or canary."""
    from keel.errors import ClusterError
    from keel.registry import reject_by_hand
    from keel.serve.control import ServeError, withdraw_challengers

    name, version = model_and_version(model, version)
    settings = load_settings()
    result = reject_by_hand(name, version, reason, settings)
    try:
        result["withdrawn_from"] = withdraw_challengers(name, f"models:/{name}/{result['version']}", settings)
    except (ServeError, ClusterError) as e:
        raise type(e)(f"v{result['version']} is rejected, but where it serves as a shadow or canary it was not "
                      f"withdrawn: {e} Retry with this command.") from e
    if output is OutputFormat.json:
        print_json(result)
        return
    typer.echo(f"{name}: v{result['version']} rejected ({result['reason']})")
    typer.echo(f"Withdrew its shadow or canary; the champion serves all requests at {result['withdrawn_from']}"
               if result["withdrawn_from"] else "No shadow or canary served it.")
