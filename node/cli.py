"""The ``dermnode`` command line (typer). Names follow docs/interface.md: keep them stable."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from node.config import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dermnode: DICOM AI evidence creator for dermoscopy.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect and try model packages.")
jobs_app = typer.Typer(no_args_is_help=True, help="Inspect and manage jobs in the journal.")
app.add_typer(model_app, name="model")
app.add_typer(jobs_app, name="jobs")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (DERMNODE_* env vars override it).")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"dermnode: {exc}", err=True)
        raise typer.Exit(2) from None


def _load_classifier(path: Path, device: str):
    from node.model.card import CardError
    from node.model.classifier import Classifier

    try:
        return Classifier.load(path, device=device)
    except CardError as exc:
        typer.echo(f"dermnode: cannot load model: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node: C-STORE SCP -> process -> C-STORE the 4 results to the destination."""
    s = _settings(config)
    from node.ops.logs import setup_logging

    setup_logging(s.logging.level, s.logging.format, audit_file=s.logging.audit_file)
    # a Celery front end does not load the model (its workers do); it still checks the card
    classifier = None if s.executor.kind == "celery" else _load_classifier(s.model.resolved_path(), s.model.device)
    from node.service import Node

    from node.model.card import CardError

    try:
        node = Node(s, classifier)
    except CardError as exc:
        typer.echo(f"dermnode: cannot load model: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"dermnode: cannot start: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        node.run_forever()
    except OSError as exc:  # e.g. port in use
        typer.echo(f"dermnode: {exc}", err=True)
        node.stop()
        raise typer.Exit(2) from None


def _iter_inputs(inputs: list[Path]):
    for p in inputs:
        if p.is_dir():
            yield from sorted(x for x in p.rglob("*") if x.is_file())
        else:
            yield p


@app.command()
def process(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    png: Annotated[bool, typer.Option("--png", help="Also write PNG previews (Grad-CAM overlay, lesion outline).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Offline processing: write the 4 derived objects per input (exit 1 if any input failed)."""
    import pydicom
    from tqdm import tqdm

    from node.evidence.identity import NodeIdentity
    from node.executor.job import KINDS, derive, encode
    from node.ops.logs import setup_logging
    from node.pipeline.process import ProcessOptions
    from node.preview import write_png

    s = _settings(config)
    setup_logging("WARNING", s.logging.format)
    classifier = _load_classifier(s.model.resolved_path(), s.model.device)
    files = list(_iter_inputs(inputs))
    if not files:
        typer.echo("dermnode: no input files", err=True)
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    options = ProcessOptions(max_pixels=s.limits.max_pixels)
    identity = NodeIdentity()
    failures: list[tuple[Path, str]] = []
    summary = []
    for f in tqdm(files, desc="dermnode process", unit="image", file=sys.stderr):
        try:
            ds = pydicom.dcmread(f)
            if str(ds.get("SOPClassUID", "")) not in s.node.sop_classes:
                raise ValueError(f"SOP class {ds.get('SOPClassUID', '(none)')} is not a configured input class")
            evidence, derived = derive(ds, classifier, identity, options, datetime.now().astimezone())
        except Exception as exc:  # noqa: BLE001 - reported per file
            failures.append((f, f"{type(exc).__name__}: {exc}"))
            continue
        target = out / str(ds.SOPInstanceUID)
        target.mkdir(parents=True, exist_ok=True)
        for kind, d in zip(KINDS, derived):
            (target / f"{kind}.dcm").write_bytes(encode(d))
        if png:
            write_png(evidence, target / "preview.png")
        summary.append({
            "input": str(f),
            "output": str(target),
            "top_class": evidence.top_class.code,
            "probability": round(float(evidence.probabilities[evidence.top_index]), 4),
            "segmentation": "ok" if evidence.segmentation.ok else evidence.segmentation.failure,
        })
    (out / "summary.json").write_text(json.dumps({"processed": summary, "failed": [
        {"input": str(f), "reason": r} for f, r in failures]}, indent=2))
    typer.echo(f"{len(summary)} processed, {len(failures)} failed; outputs in {out}")
    for f, reason in failures:
        typer.echo(f"FAILED {f}: {reason}", err=True)
    raise typer.Exit(1 if failures else 0)


@app.command()
def echo(
    config: ConfigOpt = None,
    self_: Annotated[bool, typer.Option("--self", help="Echo this node instead of the destination.")] = False,
) -> None:
    """C-ECHO the configured destination (or this node with --self)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    s = _settings(config)
    if self_:
        host = "127.0.0.1" if s.node.bind in ("0.0.0.0", "::", "") else s.node.bind
        target = (s.node.ae_title, host, s.node.port)
    else:
        target = (s.destination.ae_title, s.destination.host, s.destination.port)
    ae = AE(ae_title=s.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate(target[1], target[2], ae_title=target[0])
    if not assoc.is_established:
        typer.echo(f"C-ECHO {target[0]}@{target[1]}:{target[2]}: association failed", err=True)
        raise typer.Exit(1)
    rsp = assoc.send_c_echo()
    assoc.release()
    status = int(getattr(rsp, "Status", 0xFFFF))
    typer.echo(f"C-ECHO {target[0]}@{target[1]}:{target[2]}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where Orthanc and the node keep their data.")] = Path("var/demo"),
    images: Annotated[int, typer.Option(help="How many fixture images to push.")] = 4,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Exit after the results arrived.")] = False,
) -> None:
    """Start a local Orthanc and the node, push fixture images, print the Orthanc Explorer URL."""
    from node.demo import orthanc_binary, run_demo

    if orthanc_binary() is None:
        typer.echo("dermnode demo needs Orthanc: apt-get install orthanc (tools/setup --test installs it)", err=True)
        raise typer.Exit(2)
    summary = run_demo(workdir.resolve(), n_images=images, wait=not no_wait, echo=typer.echo)
    ok = summary["instances"] >= 5 * summary["images"]
    raise typer.Exit(0 if ok else 1)


@app.command()
def worker(
    config: ConfigOpt = None,
    queue: Annotated[Optional[str], typer.Option(help="cpu|gpu (default: executor.queue).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Pool processes, each with its own model.")] = 1,
    threads: Annotated[int, typer.Option(min=0, max=256, help="Torch threads per process (0: cores / concurrency).")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Celery node name (default dermnode-QUEUE-PID@host).")] = None,
) -> None:
    """Scale-out worker (executor.kind = celery): take jobs from the broker, process, send the 4 results."""
    s = _settings(config)
    queue = queue or s.executor.queue
    if queue not in ("cpu", "gpu"):
        typer.echo(f"dermnode: --queue must be cpu or gpu, got {queue!r}", err=True)
        raise typer.Exit(2)
    try:
        from node.executor.celery_worker import run_worker
    except ImportError as exc:
        typer.echo(f"dermnode worker needs Celery: pip install 'dermnode[celery]' ({exc})", err=True)
        raise typer.Exit(2) from None
    run_worker(s, queue=queue, concurrency=concurrency, threads=threads, name=name)


@app.command()
def bench(
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")] = None,
    size: Annotated[str, typer.Option(help="tiny (smoke, < 1 min) | small | full.")] = "small",
    repeat: Annotated[Optional[int], typer.Option(min=1, help="Repeats (medians reported).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Benchmark on loopback: compute ceiling, model, ingest, end to end, memory (docs/performance.md)."""
    from node.bench import SIZES, main

    if size not in SIZES:
        typer.echo(f"dermnode: --size must be one of {', '.join(SIZES)}", err=True)
        raise typer.Exit(2)
    _settings(config)  # a bad config stops here, with its message
    raise typer.Exit(main(size=size, repeat=repeat, json_path=json_out, config=config))


# -- model -----------------------------------------------------------------
@model_app.command("info")
def model_info(path: Annotated[Path, typer.Argument(help="Model package directory.")]) -> None:
    """Print the model card."""
    from node.model.card import CardError, read_card

    try:
        card = read_card(path)
    except CardError as exc:
        typer.echo(f"dermnode: {exc}", err=True)
        raise typer.Exit(2) from None
    m = card.model
    typer.echo(f"{m.name} {m.version}  ({card.label})")
    typer.echo(f"  UID            {m.uid}")
    typer.echo(f"  architecture   {card.architecture.name}  (Grad-CAM layer {card.architecture.cam_layer})")
    typer.echo(f"  input          {card.input.size[1]}x{card.input.size[0]}, framing {card.input.framing}")
    typer.echo(f"  intended use   {m.intended_use}")
    typer.echo("  classes")
    for c in card.classes:
        typer.echo(f"    {c.code:6s} {c.display:32s} SCT {c.snomed} {c.snomed_meaning}")
    if card.training.data:
        typer.echo(f"  training data  {card.training.data}")
        typer.echo(f"  licence        {card.training.licence}")
    e = card.evaluation
    if e.balanced_accuracy is not None:
        typer.echo(f"  held-out       n={e.n} balanced accuracy {e.balanced_accuracy:.3f}, melanoma AUC {e.melanoma_auc}")
        typer.echo("  recall         " + ", ".join(f"{k} {v:.2f}" for k, v in e.recall.items()))
    if e.full_frame:
        typer.echo("  full frames    " + ", ".join(f"{k} {v}" for k, v in e.full_frame.items()))


@model_app.command("check")
def model_check(
    path: Annotated[Path, typer.Argument(help="Model package directory.")],
    image: Annotated[Optional[Path], typer.Option(help="A DICOM file to run (default: a synthetic image).")] = None,
    device: str = "auto",
) -> None:
    """Load the model and run one image through the whole pipeline."""
    import numpy as np
    import pydicom

    from node.pipeline.process import ProcessOptions, process

    clf = _load_classifier(path, device)
    t0 = time.perf_counter()
    if image is not None:
        ev = process(pydicom.dcmread(image), clf, ProcessOptions())
        probs, cam = ev.probabilities, ev.cam
    else:
        rows, cols = clf.card.input.size
        yy, xx = np.mgrid[0:rows, 0:cols]
        lesion = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 4) ** 2
        img = np.full((rows, cols, 3), (200, 160, 140), np.uint8)
        img[lesion] = (90, 60, 50)
        p, c = clf.predict(img[None])
        probs, cam = p[0], c[0]
    dt = time.perf_counter() - t0
    order = np.argsort(probs)[::-1]
    typer.echo(f"{clf.card.model.name} {clf.card.model.version} on {clf.device}: OK in {dt * 1e3:.0f} ms")
    for i in order:
        typer.echo(f"  {clf.card.classes[i].code:6s} {probs[i]:.3f}")
    typer.echo(f"  Grad-CAM {cam.shape[1]}x{cam.shape[0]}, range {cam.min():.2f}..{cam.max():.2f}")


# -- jobs ------------------------------------------------------------------
def _journal(config: Path | None):
    from node.intake.journal import Journal

    s = _settings(config)
    path = Path(s.storage.dir) / "journal.sqlite"
    if not path.exists():
        typer.echo(f"dermnode: no journal at {path}", err=True)
        raise typer.Exit(2)
    return s, Journal(path)


def _ts(t: float | None) -> str:
    return "-" if not t else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("list")
def jobs_list(
    state: Annotated[Optional[str], typer.Option(help="received|processing|encoded|done|dead")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """List jobs, newest first."""
    _, j = _journal(config)
    jobs = j.list_jobs(state)
    if as_json:
        typer.echo(json.dumps([job.__dict__ for job in jobs], indent=2))
        return
    typer.echo(f"{'JOB':16s}  {'STATE':10s}  {'RECEIVED':19s}  {'TRIES':5s}  SOP INSTANCE UID / LAST ERROR")
    for job in jobs:
        typer.echo(f"{job.id:16s}  {job.state:10s}  {_ts(job.received_at)}  {job.attempts}/{job.send_attempts:<3d}  {job.sop_instance_uid}"
                   + (f"  @{job.worker}" if job.worker else ""))
        if job.last_error and job.state != "done":
            typer.echo(f"{'':16s}  {'':10s}  {'':19s}  {'':5s}  ! {job.last_error}")
    counts = j.counts()
    typer.echo("  ".join(f"{k}={v}" for k, v in counts.items()))


@jobs_app.command("show")
def jobs_show(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, config: ConfigOpt = None) -> None:
    """Show one job's timeline: received, processing, each output sent, with statuses."""
    _, j = _journal(config)
    job = j.get(job_id)
    if job is None:
        typer.echo(f"dermnode: no job {job_id}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(j.to_dict(job), indent=2))
        return
    typer.echo(f"job {job.id}  state {job.state}  model {job.model}")
    typer.echo(f"  input  {job.sop_instance_uid}  (class {job.sop_class_uid}, from {job.calling_ae})")
    typer.echo(f"  study  {job.study_uid}")
    if job.task_id or job.worker:
        typer.echo(f"  task   {job.task_id or '-'}  worker {job.worker or '-'}")
    if job.last_error:
        typer.echo(f"  last error  {job.last_error}")
    if job.state == "encoded" and job.next_attempt_at > time.time():
        typer.echo(f"  next send attempt  {_ts(job.next_attempt_at)}")
    typer.echo("  timeline")
    for at, ev, detail in j.events(job.id):
        typer.echo(f"    {_ts(at)}  {ev:18s} {detail}")
    typer.echo("  outputs")
    for o in j.outputs(job.id):
        st = f"0x{o.status:04X}" if o.status is not None else "-"
        typer.echo(f"    {o.kind:5s} {o.state:8s} {st:7s} {_ts(o.sent_at)}  {o.sop_instance_uid}")


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[Optional[str], typer.Argument()] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead")] = False,
    config: ConfigOpt = None,
) -> None:
    """Requeue a dead job (or all dead jobs). A running node picks them up within seconds."""
    _, j = _journal(config)
    ids = [x.id for x in j.list_jobs("dead", limit=100000)] if all_dead else ([job_id] if job_id else [])
    if not ids:
        typer.echo("dermnode: give a job id or --all-dead", err=True)
        raise typer.Exit(1)
    n = sum(1 for i in ids if j.requeue(i))
    typer.echo(f"requeued {n} job(s)")
    raise typer.Exit(0 if n == len(ids) else 1)


@jobs_app.command("purge")
def jobs_purge(
    older_than_hours: Annotated[float, typer.Option(help="Only jobs finished this long ago.")] = 0.0,
    dead: Annotated[bool, typer.Option("--dead", help="Also purge dead jobs and their files.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Delete finished jobs from the journal, with their spool files."""
    from node.intake.spool import Spool

    s, j = _journal(config)
    spool = Spool(Path(s.storage.dir))
    states = ("done", "dead") if dead else ("done",)
    ids = j.purge(time.time() - older_than_hours * 3600, states)
    for i in ids:
        spool.remove_job(i)
    typer.echo(f"purged {len(ids)} job(s)")


if __name__ == "__main__":  # pragma: no cover
    app()
