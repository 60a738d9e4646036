"""The status page's HTML: rendered here once per load, then updated in place by its script.

The server renders every value; each one is an element whose ``data-f``
attribute is its path in the JSON document (``groups.0.blocks.1.servers.2.rps``)
and whose ``data-t`` is its format.  The inline script (no framework, no
build step, nothing fetched from elsewhere) opens the ``events`` stream and,
on each message, writes every such element again with the same formats as
:func:`fmt`; when the document's ``layout`` changes (a server added, a
route reloaded) it reloads the page, which the server renders anew.
"""

from __future__ import annotations

from html import escape
from typing import Any

from .collect import Group

__all__ = ["fmt", "render"]

_STATE_CLASSES = ("healthy", "unhealthy", "ejected", "draining", "standby", "tripped", "recovering")


def fmt(kind: str, value: Any) -> str:
    """A value as the page shows it (the script's ``fmt`` does the same)."""
    if value is None:
        return "–"
    if kind == "ms":
        return f"{value:.1f} ms"
    if kind == "pct":
        return f"{value * 100:.1f} %"
    if kind == "n2":
        return f"{value:.2f}"
    if kind == "s":
        return f"{value:.1f} s"
    if kind == "g":
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def server_detail(server: dict[str, Any]) -> str:
    """What follows a server's state: why it is out, and for how long still."""
    parts = [str(server["reason"])] if server.get("reason") else []
    if server.get("ejected_for") is not None:
        parts.append(f"{server['ejected_for']:.1f} s left")
    return ", ".join(parts)


def breaker_state(breaker: dict[str, Any]) -> str:
    text = str(breaker.get("state", ""))
    if breaker.get("state_for") is not None:
        text += f", {breaker['state_for']:.1f} s left"
    return text


def _state_class(state: object) -> str:
    first = str(state).split("+")[0]
    return "st-" + (first if first in _STATE_CLASSES else "other")


def _v(path: str, kind: str, value: Any) -> str:
    return f'<span data-f="{escape(path)}" data-t="{kind}">{escape(fmt(kind, value))}</span>'


def spark_points(values: list[float], width: int = 120, height: int = 24) -> str:
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values)
    )


_SERVER_COLUMNS = (
    ("weight", "weight", "v"),
    ("in_flight", "in flight", "v"),
    ("rps", "req/s", "n2"),
    ("error_ratio", "errors", "pct"),
    ("p50_ms", "p50", "ms"),
    ("p99_ms", "p99", "ms"),
    ("retries", "retries", "v"),
    ("hedges", "hedges", "v"),
)


def _balancer(path: str, block: dict[str, Any]) -> list[str]:
    notes = [n for n in (block.get("health_check"),) if n]
    if block.get("outlier_detection"):
        notes.append("outlier detection")
    if block.get("sticky"):
        notes.append("sticky sessions")
    head = "".join(f"<th>{label}</th>" for _, label, _ in _SERVER_COLUMNS)
    out = [
        f"<h3>{escape(str(block['kind']))} <small>{escape(' · '.join(notes))}</small></h3>",
        f"<table><tr><th>server</th><th>state</th>{head}<th>p50 by second</th></tr>",
    ]
    for i, server in enumerate(block.get("servers", ())):
        sp = f"{path}.servers.{i}"
        state = server.get("state", "")
        cells = "".join(
            f"<td class=num>{_v(f'{sp}.{key}', kind, server.get(key))}</td>"
            for key, _, kind in _SERVER_COLUMNS
        )
        spark = escape(spark_points(list(server.get("sparkline", ()))))
        top = max(server.get("sparkline") or [0.0])
        out.append(
            f'<tr data-url="{escape(str(server.get("url")))}">'
            f"<td>{escape(str(server.get('url')))}</td>"
            f'<td class="state {_state_class(state)}" data-s="{escape(sp)}">'
            f"<span>{escape(str(state))}</span> <small>{escape(server_detail(server))}</small>"
            f"</td>{cells}"
            f'<td><svg class=spark data-spark="{escape(sp)}" width=120 height=24>'
            f'<title>max {top:.1f} ms</title><polyline points="{spark}"/></svg></td></tr>'
        )
    registry = block.get("registry") or {}
    out.append("</table>")
    if registry:
        out.append(_registry(path + ".registry", registry))
    return out


def _registry(path: str, registry: dict[str, Any]) -> str:
    rows = []
    for i, server in enumerate(registry.get("servers", ())):
        sp = f"{path}.servers.{i}"
        rows.append(
            f"<tr><td>{escape(str(server.get('url')))}</td>"
            f"<td>{_v(sp + '.state', 'v', server.get('state'))}</td>"
            f"<td>{_v(sp + '.health', 'v', server.get('health'))}</td>"
            f"<td class=num>{_v(sp + '.weight', 'v', server.get('weight'))}</td></tr>"
        )
    title = escape(f"{registry.get('name', '')} at {registry.get('url', '')}")
    return (
        f"<h4>fleet-wide: registry {title}, probed by "
        f"{_v(path + '.prober', 'v', registry.get('prober'))} "
        f"<span class=off>{_v(path + '.error', 'v', registry.get('error') or '')}</span></h4>"
        "<table><tr><th>server</th><th>state</th><th>health</th><th>weight</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _breaker(path: str, block: dict[str, Any]) -> list[str]:
    state = block.get("state", "")
    out = [
        "<h3>CircuitBreaker</h3>",
        f'<p>state: <b class="state {_state_class(state)}" data-b="{escape(path)}">'
        f"{escape(breaker_state(block))}</b> · trips when "
        f"<code>{escape(str(block.get('expression', '')))}</code></p>",
        "<table><tr><th>function</th><th>value now</th><th>threshold</th><th>holds</th></tr>",
    ]
    for i, term in enumerate(block.get("terms", ())):
        tp = f"{path}.terms.{i}"
        out.append(
            f"<tr><td><code>{escape(str(term.get('call')))}</code></td>"
            f"<td class=num>{_v(tp + '.value', 'g', term.get('value'))}</td>"
            f"<td class=num>{escape(str(term.get('op')))} {term.get('threshold'):g}</td>"
            f"<td>{_v(tp + '.holds', 'v', term.get('holds'))}</td></tr>"
        )
    out.append("</table>")
    return out


def _generic(path: str, block: dict[str, Any]) -> list[str]:
    rows = "".join(
        f"<tr><th>{escape(key)}</th><td>{_v(f'{path}.{key}', 'v', value)}</td></tr>"
        for key, value in block.items()
        if key != "kind"
    )
    return [f"<h3>{escape(str(block.get('kind')))}</h3>", f"<table class=kv>{rows}</table>"]


def render(title: str, doc: dict[str, Any]) -> str:
    """The whole page for the JSON document ``doc`` (what ``status.json`` serves)."""
    groups: list[Group] = doc["groups"]
    body: list[str] = []
    for g, group in enumerate(groups):
        body.append(f"<section><h2>{escape(group['name'])}</h2>")
        for b, block in enumerate(group["blocks"]):
            path = f"groups.{g}.blocks.{b}"
            body.append('<div class="block">')
            if "servers" in block:
                body.extend(_balancer(path, block))
            elif "terms" in block:
                body.extend(_breaker(path, block))
            else:
                body.extend(_generic(path, block))
            body.append("</div>")
        body.append("</section>")
    if not groups:
        body.append("<p>No balancer, breaker or limit found in this chain.</p>")
    proc = doc["process"]
    parts = [
        _v("process.hostname", "v", proc["hostname"]),
        "pid " + _v("process.pid", "v", proc["pid"]),
    ]
    if proc.get("gunicorn_master") is not None:
        parts.append(
            "gunicorn worker of " + _v("process.gunicorn_master", "v", proc["gunicorn_master"])
        )
    who = " · ".join(parts)
    return _TEMPLATE.format(
        title=escape(title),
        layout=escape(str(doc["layout"])),
        who=who,
        body="\n".join(body),
        script=_SCRIPT,
        style=_STYLE,
    )


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:18px;margin:0}header .who{opacity:.85}#live{margin-left:auto}
main{padding:6px 18px 24px}section{margin-top:14px}h2{font-size:16px;margin:8px 0}
h3{font-size:14px;margin:10px 0 4px}h3 small{font-weight:normal;color:#5b6474}
.block{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:6px 12px 10px;
margin-bottom:10px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f3;white-space:nowrap}
th{font-weight:600;color:#5b6474;font-size:12px}td.num{text-align:right;
font-variant-numeric:tabular-nums}table.kv{width:auto}
.state{font-weight:600}td.state{white-space:normal;min-width:90px;max-width:300px}
td.state small{display:block;font-weight:normal;font-size:12px;line-height:1.3}
.st-healthy,.st-standby{color:#17803d}.st-draining,
.st-recovering{color:#a15c00}.st-unhealthy,.st-ejected,.st-tripped{color:#c4141b}
svg.spark polyline{fill:none;stroke:#3867d6;stroke-width:1.5}
.off{color:#c4141b}code{background:#eef0f3;padding:0 4px;border-radius:3px}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var layout = document.body.getAttribute("data-layout");
  function get(doc, path) {
    var parts = path.split("."), v = doc;
    for (var i = 0; i < parts.length && v !== null && v !== undefined; i++) v = v[parts[i]];
    return v;
  }
  function fmt(t, v) {
    if (v === null || v === undefined) return "\u2013";
    if (t === "ms") return v.toFixed(1) + " ms";
    if (t === "pct") return (v * 100).toFixed(1) + " %";
    if (t === "n2") return v.toFixed(2);
    if (t === "s") return v.toFixed(1) + " s";
    if (t === "g") return String(Number(v.toPrecision(4)));
    if (v === true) return "yes";
    if (v === false) return "no";
    if (Array.isArray(v)) return v.join("; ");
    return String(v);
  }
  function stateClass(s) {
    var first = String(s).split("+")[0];
    var known = ["healthy", "unhealthy", "ejected", "draining", "standby", "tripped", "recovering"];
    return "st-" + (known.indexOf(first) >= 0 ? first : "other");
  }
  function setState(el, state, text) {
    el.textContent = text;
    el.className = "state " + stateClass(state);
  }
  function points(values) {
    if (values.length < 2) return "";
    var top = Math.max.apply(null, values) || 1, step = 120 / (values.length - 1), out = [];
    for (var i = 0; i < values.length; i++)
      out.push((i * step).toFixed(1) + "," + (23 - (values[i] / top) * 22).toFixed(1));
    return out.join(" ");
  }
  function update(doc) {
    if (doc.layout !== layout) { location.reload(); return; }
    document.querySelectorAll("[data-f]").forEach(function (el) {
      el.textContent = fmt(el.getAttribute("data-t"), get(doc, el.getAttribute("data-f")));
    });
    document.querySelectorAll("[data-s]").forEach(function (el) {
      var s = get(doc, el.getAttribute("data-s")) || {}, detail = s.reason ? [s.reason] : [];
      if (s.ejected_for !== null && s.ejected_for !== undefined)
        detail.push(s.ejected_for.toFixed(1) + " s left");
      el.querySelector("span").textContent = String(s.state);
      el.querySelector("small").textContent = detail.join(", ");
      el.className = "state " + stateClass(s.state);
    });
    document.querySelectorAll("[data-b]").forEach(function (el) {
      var b = get(doc, el.getAttribute("data-b")) || {}, text = String(b.state);
      if (b.state_for !== null && b.state_for !== undefined)
        text += ", " + b.state_for.toFixed(1) + " s left";
      setState(el, b.state, text);
    });
    document.querySelectorAll("[data-spark]").forEach(function (el) {
      var s = get(doc, el.getAttribute("data-spark")) || {}, values = s.sparkline || [];
      el.querySelector("polyline").setAttribute("points", points(values));
      el.querySelector("title").textContent =
        "max " + Math.max.apply(null, values.concat([0])).toFixed(1) + " ms";
    });
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  }
  var live = document.getElementById("live");
  var base = location.pathname.replace(/\/+$/, "");
  var source = new EventSource(base + "/events");
  source.onmessage = function (e) {
    live.textContent = "live";
    live.className = "";
    update(JSON.parse(e.data));
  };
  source.onerror = function () {
    live.textContent = "reconnecting\u2026";
    live.className = "off";
  };
})();
"""

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body data-layout="{layout}">
<header><h1>{title}</h1><span class="who">{who}</span>
<span id="live">connecting…</span><span>updated <span id="updated">–</span></span></header>
<main>
{body}
</main>
<script>{script}</script>
</body></html>
"""
