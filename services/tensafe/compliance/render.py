"""The report as files: ``report.json`` always, ``report.html`` (self-contained: inline CSS and SVG, no script,
nothing fetched), and ``report.pdf`` when a headless Chromium is installed (printed from the HTML)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from .report import Report, SessionEvidence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#1b1f24;
line-height:1.4}h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d0d7de;
padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f6f8fa}code,.mono{font-family:ui-monospace,
SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}.ok{background:#dafbe1;border:1px solid #4ac26b;
padding:.6em 1em}.bad{background:#ffebe9;border:1px solid #ff8182;padding:.6em 1em}.note{color:#57606a;
font-size:.9em}.tag{display:inline-block;padding:0 .4em;border-radius:.8em;font-size:.8em;border:1px solid}
.attested{background:#dafbe1;border-color:#4ac26b}.declared{background:#fff8c5;border-color:#d4a72c}
svg{background:#fff;border:1px solid #d0d7de}
@media print{a{color:inherit;text-decoration:none}h2{page-break-after:avoid}}
"""


def _t(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


def _refs(indices: list[int] | int | None, limit: int = 12) -> str:
    if indices is None:
        return "-"
    items = [indices] if isinstance(indices, int) else indices
    shown = ", ".join(f'<a href="#e{i}">#{i}</a>' for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="note">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def epsilon_svg(session: SessionEvidence, width: int = 520, height: int = 200) -> str:
    """Epsilon after each accounted step, with the target as a dashed line; each point links its entry."""
    points = session.epsilon
    target = float(session.dp_settings.get("target_epsilon", "0") or 0)
    if not points:
        return '<p class="note">No DP step was recorded for this session.</p>'
    pad_l, pad_b, pad_t, pad_r = 48, 28, 10, 10
    max_step = max(p.step for p in points)
    max_eps = max(max(p.epsilon for p in points), target) * 1.08 or 1.0
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(step: float, eps: float) -> tuple[float, float]:
        return pad_l + w * step / max(max_step, 1), pad_t + h * (1 - eps / max_eps)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in
                    enumerate(xy(p.step, p.epsilon) for p in points))
    dots = "".join(f'<a href="#e{p.entry}"><circle cx="{xy(p.step, p.epsilon)[0]:.1f}" '
                   f'cy="{xy(p.step, p.epsilon)[1]:.1f}" r="3" fill="#0969da"><title>step {p.step}: epsilon '
                   f'{p.epsilon:.4g} (entry #{p.entry})</title></circle></a>' for p in points)
    target_line = ""
    if target:
        _, ty = xy(0, target)
        target_line = (f'<line x1="{pad_l}" y1="{ty:.1f}" x2="{pad_l + w}" y2="{ty:.1f}" stroke="#cf222e" '
                       f'stroke-dasharray="5,4"/><text x="{pad_l + w - 4}" y="{ty - 4:.1f}" text-anchor="end" '
                       f'font-size="11" fill="#cf222e">target {target:g}</text>')
    axes = (f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#57606a"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#57606a"/>'
            f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">accounted steps '
            f'(max {max_step})</text><text x="12" y="{pad_t + h / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {pad_t + h / 2})">epsilon</text>'
            f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" font-size="10">{max_eps:.3g}</text>'
            f'<text x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end" font-size="10">0</text>')
    return (f'<svg role="img" aria-label="epsilon over steps for {escape(session.session_id)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{axes}{target_line}'
            f'<path d="{path}" fill="none" stroke="#0969da" stroke-width="1.5"/>{dots}</svg>')


def _session_html(s: SessionEvidence) -> str:
    sampling = (f'<span class="tag {s.sampling}">{s.sampling}</span>' if s.dp else "no DP")
    settings = ", ".join(f"{escape(k)} = <code>{escape(v)}</code>" for k, v in sorted(s.dp_settings.items()))
    ckpts = _table(["artifact", "lineage attested", "budgets (id:epsilon)", "private / non-private steps",
                    "entry"],
                   [[f"<code>{escape(c.get('artifact_id', ''))}</code>", escape(c.get("lineage_attested", "")),
                     f"<code>{escape(c.get('budgets', ''))}</code>",
                     f"{escape(c.get('private_steps', ''))} / {escape(c.get('non_private_steps', ''))}",
                     _refs(int(c["entry"]))] for c in s.checkpoints], "No checkpoint saved.")
    return (f'<h3 id="s-{escape(s.session_id)}">Session <code>{escape(s.session_id)}</code></h3>'
            f"<p>Created {_t(s.created)} ({_refs(s.entry)}); model <code>{escape(s.model_ref)}</code>, LoRA rank "
            f"{escape(s.lora_rank)}; privacy: {sampling}"
            + (f"; budget <code>{escape(s.budget_id)}</code>; final epsilon <b>{s.final_epsilon:.4g}</b> after "
               f"{s.epsilon[-1].step if s.epsilon else 0} accounted steps" if s.dp else "")
            + (f"; closed ({_refs(s.closed_entry)})" if s.closed_entry is not None else "") + "</p>"
            + (f"<p>DP settings: {settings}</p>{epsilon_svg(s)}" if s.dp else "")
            + (f"<p>Budget refusals: {_refs(s.refusals)}</p>" if s.refusals else "") + ckpts)


def to_html(report: Report) -> str:
    v = report.verification
    if v["ok"]:
        banner = (f'<div class="ok"><b>Verified.</b> {v["tenant_entries"]} entries of tenant '
                  f'<code>{escape(report.tenant_id)}</code>, in a log of {v["verified_size"]} entries whose signed '
                  f'checkpoint (root <code>{escape(v["root_hash"])}</code>) was checked with verifier key '
                  f'<code>{escape(v["verifier_key"])}</code>. Source: {escape(v["source"])}.</div>')
    else:
        banner = (f'<div class="bad"><b>The ledger did not verify:</b> {escape(v["problem"] or "")}. This report '
                  f'uses only the {v["verified_size"]} entries covered by the last checkpoint that verifies '
                  f'({v["tenant_entries"]} of this tenant); {v["excluded_entries"]} later entries of this tenant '
                  "are UNVERIFIABLE and are not used. Source: " + escape(v["source"]) + ".</div>")
    sessions = "".join(_session_html(s) for s in report.sessions) or '<p class="note">No training session.</p>'
    sections = [
        ("Training sessions, DP settings and epsilon", sessions),
        ("Privacy budget refusals", _table(
            ["time", "action", "reason", "session", "epsilon with the step", "target", "entry"],
            [[_t(r["time"]), escape(r["action"]), escape(r["reason"]), f"<code>{escape(r['session_id'])}</code>",
              escape(r["epsilon_with_step"]), escape(r["target_epsilon"]), _refs(r["entry"])]
             for r in report.budget_refusals], "No step was refused for the privacy budget.")),
        ("Artifacts (encrypted at rest)", _table(
            ["time", "artifact", "kind", "session", "cipher", "tenant key version", "bytes", "plaintext SHA-256",
             "entry"],
            [[_t(a["time"]), f"<code>{escape(a['artifact_id'])}</code>", escape(a.get("kind", "")),
              f"<code>{escape(a.get('session_id', ''))}</code>", escape(a.get("cipher", "")),
              escape(a.get("kek_version", "")), escape(a.get("size_bytes", "")),
              f"<code>{escape(a.get('plaintext_sha256', '')[:16])}</code>", _refs(a["entry"])]
             for a in report.artifacts], "No artifact stored.")),
        ("Reads of artifacts and keys", _table(
            ["action", "actor", "count", "entries"],
            [[escape(r["action"]), escape(r["actor"]), str(r["count"]), _refs(r["entries"])]
             for r in report.artifact_reads], "No artifact was read.")),
        ("Tenant key rotations and shreds", _table(
            ["time", "action", "details", "entry"],
            [[_t(k["time"]), escape(k["action"]),
              escape(", ".join(f"{a}={b}" for a, b in sorted(k.items()) if a not in ("entry", "time", "action"))),
              _refs(k["entry"])] for k in report.key_events], "No key rotation or shred.")),
        ("Refused requests", _table(
            ["action", "reason", "count", "entries"],
            [[escape(r["action"]), escape(r["reason"]), str(r["count"]), _refs(r["entries"])]
             for r in report.refused_requests], "No request was refused.")),
        ("API keys", _table(
            ["time", "event", "key", "expires", "entry"],
            [[_t(k["time"]), escape(k["action"]), f"<code>{escape(k['key_id'])}</code>",
              escape(k["expires_at"] or "never"), _refs(k["entry"])] for k in report.api_keys],
            "No API key event for this tenant.")),
        ("Control mapping (evidence, not certification)", "<p class='note'>What this report holds that bears on "
         "each control. It is evidence for an assessor; it does not state that any control is met.</p>" + _table(
            ["framework", "control", "what TenSafe records", "in this report"],
            [[escape(c["framework"]), escape(c["control"]), escape(c["how"]), escape(c["evidence"])]
             for c in report.controls], "")),
        ("Appendix: every verified entry", _table(
            ["#", "time", "service", "action", "resource", "outcome", "reason", "actor", "leaf hash"],
            [[f'<span id="e{e.index}">{e.index}</span>', _t(e.time), escape(e.service), escape(e.action),
              f"<code>{escape(e.resource_id)}</code>", escape(e.outcome), escape(e.reason), escape(e.actor),
              f"<code>{e.leaf_hash[:16]}</code>"] for e in report.entries], "No entry.")),
    ]
    body = "".join(f"<h2>{escape(title)}</h2>{content}" for title, content in sections)
    period = f"{_t(v['first_time'])} to {_t(v['last_time'])}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>TenSafe compliance evidence: '
            f"{escape(report.tenant_id)}</title><style>{CSS}</style></head><body>"
            f"<h1>Compliance evidence for tenant <code>{escape(report.tenant_id)}</code></h1>"
            f'<p class="note">Generated {_t(report.generated_at)} by <code>tensafe compliance report</code> from the '
            f"audit ledger only; period covered: {period}; log origin <code>{escape(v['origin'])}</code>.</p>"
            f"{banner}{body}</body></html>")


def write(report: Report, out_dir: Path, pdf: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    files["json"].write_text(json.dumps(report.as_dict(), indent=1, sort_keys=True, default=_json_default))
    files["html"].write_text(to_html(report))
    if pdf:
        browser = chromium()
        if browser is not None:
            target = out_dir / "report.pdf"
            print_pdf(browser, files["html"], target)
            files["pdf"] = target
    return files


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def headless_args(browser: str, profile: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def print_pdf(browser: str, html: Path, pdf: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*headless_args(browser, profile), "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
