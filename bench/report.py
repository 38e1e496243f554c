"""The Markdown report of a ``bench.run`` result (medians over rounds, ratios, targets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .stats import median

MiB = 1024 * 1024

# Issue #5's LiteLLM figures (one core, another run): shown when no peer ran.
LITELLM_REF: dict[str, float] = {
    "rps_c1": 94, "rps_c16": 115, "rps_c64": 113,
    "lat_c1": 10.5, "added_lat_c1": 10.44,
    "added_ttft_c1": 8.2, "added_ttft_c64": 756,
    "cpu_ms": 9.0, "idle_rss": 341,
}
LITELLM_REF_TEXT: dict[str, str] = {
    "held_50": "yes", "held_250": "no", "cpu_ms": "8–10",
}

Getter = Callable[[dict[str, Any]], float | None]


def _get(path: str) -> Getter:
    keys = path.split(".")

    def get(record: dict[str, Any]) -> float | None:
        value: Any = record
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


class Data:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.records: list[dict[str, Any]] = raw["records"]
        self.rounds = sorted({r["round"] for r in self.records})

    def per_round(self, system: str, scenario: str, get: Getter) -> dict[int, float]:
        out: dict[int, float] = {}
        for record in self.records:
            if record["system"] == system and record["scenario"] == scenario:
                value = get(record)
                if value is not None:
                    out[record["round"]] = value
        return out

    def med(self, system: str, scenario: str, get: Getter) -> float | None:
        return median(list(self.per_round(system, scenario, get).values()))

    def added(self, system: str, scenario: str, get: Getter) -> float | None:
        """Median over rounds of (system − upstream alone) in the same round."""
        mine = self.per_round(system, scenario, get)
        base = self.per_round("upstream", scenario, get)
        return median([mine[r] - base[r] for r in mine if r in base])

    def has(self, system: str) -> bool:
        return any(r["system"] == system for r in self.records)

    def scenarios(self) -> set[str]:
        return {r["scenario"] for r in self.records}


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    if abs(value) >= 100:
        return f"{value:.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _signed(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return ("+" if value >= 0 else "") + _num(value, digits)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    q = a / b
    return f"{q:.2f}×" if q < 10 else f"{q:.1f}×"


def _pct(value: float | None) -> str:
    """A share as a percentage that never rounds a miss up to 100%."""
    if value is None:
        return "—"
    return "100%" if value >= 1.0 else f"{min(value * 100, 99.9):.1f}%"


def render(raw: dict[str, Any], json_path: str, command: str) -> str:
    data = Data(raw)
    plan = raw["plan"]
    machine = raw["machine"]
    cpus = raw["cpus"]
    peer = data.has("litellm")
    lines: list[str] = []
    add = lines.append

    started = raw["started"][:16].replace("T", " ")
    commit = machine.get("commit", "?") + (" + uncommitted changes" if machine.get("dirty")
                                           else "")
    add(f"_`{command}` — {started} UTC, commit {commit}, {len(data.rounds)} round(s)"
        f"{' (interrupted)' if raw.get('interrupted') else ''}; raw results: `{json_path}`._")
    add("")
    add(f"Machine: {machine.get('cpu', '?')}, {machine.get('nproc', '?')} CPUs, "
        f"{machine.get('mem_gib', '?')} GiB RAM, Linux {machine.get('kernel', '?')}, "
        f"Python {machine.get('python', '?')}, {machine.get('wrk', 'wrk ?')}, "
        f"{machine.get('nats_server', 'nats-server ?')}"
        + (f", LiteLLM {machine['litellm']}" if machine.get("litellm") else "")
        + f". Load average {machine.get('loadavg_start', 0):.2f} at the start, "
        f"{machine.get('loadavg_end', 0):.2f} at the end.")
    if plan.get("only") == "scaling":
        add(f"Only the scaling runs (`--only scaling`). Each run lasted {plan['duration']:g} s.")
    elif cpus.get("system") is not None:
        add(f"System under test on CPU {cpus['system']}; fake upstream and load generators "
            f"on CPU {cpus['harness']}. Each run lasted {plan['duration']:g} s.")
    else:
        add(f"No pinning: {cpus.get('note')}.")
    add("")

    if plan.get("only") != "scaling":
        _side_by_side(data, plan, peer, add)
        _targets(data, plan, peer, add)
    _scaling(data, plan, add)
    _health(raw, data, add)
    return "\n".join(lines) + "\n"


def _side_by_side(data: Data, plan: dict[str, Any], peer: bool,
                  add: Callable[[str], None]) -> None:
    """The main table: every scenario of the rounds, system next to system."""
    ref_note = "" if peer else " (reference figure, another run)"
    add(f"| scenario | upstream alone | clawbus | LiteLLM{ref_note} | clawbus ÷ LiteLLM |")
    add("|---|---:|---:|---:|---:|")

    def lite(key: str, measured: float | None) -> float | None:
        return measured if peer else LITELLM_REF.get(key)

    def row(name: str, up: str, cb: str, ll: str, ratio: str) -> None:
        add(f"| {name} | {up} | {cb} | {ll} | {ratio} |")

    rps = _get("rps")
    for c in plan["concurrency"]:
        scenario = f"rps_c{c}"
        u, cb, ll = (data.med(s, scenario, rps) for s in ("upstream", "clawbus", "litellm"))
        ll = lite(scenario, ll)
        row(f"non-streaming req/s, c={c}", _num(u, 0), _num(cb, 0), _num(ll, 0), _ratio(cb, ll))

    lat50 = _get("latency_us.p50")
    if "rps_c1" in data.scenarios():
        u, cb, ll = (data.med(s, "rps_c1", lat50) for s in ("upstream", "clawbus", "litellm"))
        ms = [None if v is None else v / 1000.0 for v in (u, cb, ll)]
        row("non-streaming latency p50, c=1 (ms)", _num(ms[0], 3), _num(ms[1], 2),
            _num(lite("lat_c1", ms[2]), 2), _ratio(ms[1], lite("lat_c1", ms[2])))
        a_cb = data.added("clawbus", "rps_c1", lat50)
        a_ll = data.added("litellm", "rps_c1", lat50)
        a_cb = None if a_cb is None else a_cb / 1000.0
        a_ll = lite("added_lat_c1", None if a_ll is None else a_ll / 1000.0)
        row("**added** latency p50, c=1 (ms)", "", _signed(a_cb), _signed(a_ll),
            _ratio(a_cb, a_ll))
    lat99 = _get("latency_us.p99")
    if "rps_c64" in data.scenarios():
        vals = [data.med(s, "rps_c64", lat99) for s in ("upstream", "clawbus", "litellm")]
        ms = [None if v is None else v / 1000.0 for v in vals]
        row("non-streaming latency p99, c=64 (ms)", _num(ms[0], 2), _num(ms[1], 1),
            _num(ms[2], 1) if peer else "—", _ratio(ms[1], ms[2]) if peer else "—")

    if "sessions_c16" in data.scenarios():
        n = plan.get("sessions", 64)
        stateless = data.med("clawbus", "rps_c16", rps)
        stateful = data.med("clawbus", "sessions_c16", rps)
        row(f"non-streaming req/s, c=16, stateful: {n} sessions (lease, history, stored "
            "turn; clawbus only)", "", _num(stateful, 0)
            + (f" ({_ratio(stateful, stateless)} stateless)" if stateless else ""), "—", "")
        cpu = data.med("clawbus", "sessions_c16", _get("cpu_ms_per_request"))
        row("… its CPU per request (ms)", "", _num(cpu, 2), "—", "")
    _session_rows(data, plan, row)

    ttft50 = _get("ttft_ms.p50")
    gap99 = _get("gap_ms.p99")
    for c in plan["ttft_concurrency"]:
        scenario = f"ttft_c{c}"
        if scenario not in data.scenarios():
            continue
        u, cb, ll = (data.med(s, scenario, ttft50) for s in ("upstream", "clawbus", "litellm"))
        row(f"TTFT p50, stream 32 × 20 ms, c={c} (ms)", _num(u, 2), _num(cb, 1),
            _num(ll, 1) if peer else "—", _ratio(cb, ll) if peer else "—")
        a_cb = data.added("clawbus", scenario, ttft50)
        a_ll = lite(f"added_ttft_c{c}", data.added("litellm", scenario, ttft50))
        row(f"**added** TTFT p50, c={c} (ms)", "", _signed(a_cb), _signed(a_ll),
            _ratio(a_cb, a_ll))
        g = [data.med(s, scenario, gap99) for s in ("upstream", "clawbus", "litellm")]
        row(f"inter-token gap p99, c={c} (ms; paced 20)", _num(g[0], 1), _num(g[1], 1),
            _num(g[2], 1) if peer else "—", "")
        wave = _get("first_wave_ttft_ms.p50")
        if c > 1 and data.med("clawbus", scenario, wave) is not None:
            w = [data.med(s, scenario, wave) for s in ("upstream", "clawbus", "litellm")]
            row(f"… first wave: {c} streams opened at once on new connections, "
                "TTFT p50 (ms)", _num(w[0], 2), _num(w[1], 1),
                _num(w[2], 1) if peer else "—", _ratio(w[1], w[2]) if peer else "—")

    on_time = _get("on_time_fraction")
    for n in plan["held"]:
        scenario = f"held_{n}"
        if scenario not in data.scenarios():
            continue
        cells = []
        for system in ("upstream", "clawbus", "litellm"):
            frac = data.med(system, scenario, on_time)
            cells.append(_pct(frac))
        ll_cell = cells[2] if peer else LITELLM_REF_TEXT.get(scenario, "—")
        row(f"held streams on time: {n} × (20 × 500 ms) opened at {plan['held_rate']:g}/s",
            cells[0], cells[1], ll_cell, "")
        late = _get("ttft_ms.p99")
        t = [data.med(s, scenario, late) for s in ("upstream", "clawbus", "litellm")]
        row(f"… their TTFT p99 (ms), {n} streams", _num(t[0], 1), _num(t[1], 0),
            _num(t[2], 0) if peer else "—", "")

    cpu_ms = _get("cpu_ms_per_request")
    vals = [data.med(s, "cpu_per_request", cpu_ms) for s in ("upstream", "clawbus", "litellm")]
    row(f"CPU per non-streaming request (ms; {plan['cpu_requests']} requests at c=16)",
        _num(vals[0], 3), _num(vals[1], 2),
        _num(vals[2], 2) if peer else LITELLM_REF_TEXT["cpu_ms"],
        _ratio(vals[1], lite("cpu_ms", vals[2])))
    for system, label in (("clawbus", "clawbus"), ("litellm", "LiteLLM")):
        roles: dict[str, list[float]] = {}
        for record in data.records:
            if record["system"] == system and record["scenario"] == "cpu_per_request":
                for role, ms in (record.get("cpu_ms_per_request_by_role") or {}).items():
                    roles.setdefault(role, []).append(float(ms))
        if len(roles) > 1:
            parts = ", ".join(f"{role} {_num(median(v), 2)}" for role, v in sorted(roles.items()))
            cb_cell, ll_cell = (parts, "") if system == "clawbus" else ("", parts)
            row(f"… {label}'s CPU per request by process (ms)", "", cb_cell, ll_cell, "")
    share = _get("system_cpu_share")
    vals = [data.med(s, "rps_c64", share) for s in ("upstream", "clawbus", "litellm")]
    row("CPU used during c=64 run (cores)", _num(vals[0], 2), _num(vals[1], 2),
        _num(vals[2], 2) if peer else "—", "")
    rss = _get("rss_bytes")
    pss = _get("pss_bytes")
    for scenario, label in (("idle_rss", "idle RSS, all processes (MiB)"),
                            ("rss_after", "RSS after the round (MiB)")):
        r = [data.med(s, scenario, rss) for s in ("upstream", "clawbus", "litellm")]
        p = [data.med(s, scenario, pss) for s in ("upstream", "clawbus", "litellm")]
        mib = [None if v is None else v / MiB for v in r]
        pmib = [None if v is None else v / MiB for v in p]

        def cell(i: int, mib: list[float | None] = mib, pmib: list[float | None] = pmib) -> str:
            if mib[i] is None:
                return "—"
            return f"{_num(mib[i], 0)} (PSS {_num(pmib[i], 0)})"

        ll_val = mib[2] if peer else (LITELLM_REF["idle_rss"] if scenario == "idle_rss"
                                      else None)
        row(label, cell(0), cell(1), cell(2) if peer else _num(ll_val, 0),
            _ratio(mib[1], ll_val))
    add("")
    add("Added = the system's figure minus the upstream alone's, per round, then the median. "
        "TTFT = request written → first content token"
        + (f", over the streams opened after a {plan['ttft_warmup']:g}-second warm-up of "
           "the closed loop (its lanes start together: the first wave's TTFT is shown on "
           "its own)" if plan.get("ttft_warmup") else "")
        + ". On time = HTTP 200, all 20 tokens and "
        f"`[DONE]`, every token *k* by open + *k* × 500 ms + {plan.get('slack_ms', 100):g} ms. "
        "For latency, CPU and memory a ratio below 1 favours clawbus.")
    ceiling = data.med("upstream", "stream_rps_c64", rps)
    plain = data.med("upstream", "rps_c64", rps)
    best = max((v for v in (data.med(s, f"rps_c{c}", rps) for s in ("clawbus", "litellm")
                            for c in plan["concurrency"]) if v is not None), default=None)
    if ceiling is not None and plain is not None:
        add("")
        add(f"Fake upstream ceiling (sharing its CPU with `wrk`): {_num(plain, 0)} non-streaming "
            f"and {_num(ceiling, 0)} streaming (32 tokens, no delay) req/s at c=64"
            + (f": {_ratio(min(plain, ceiling), best)} the best throughput of a system above."
               if best else "."))
    add("")


HISTORY = "ttft_history_c1"
HOT = "hot_session"
TOOLS = "tool_rounds_c1"


def tool_round_added(record: dict[str, Any]) -> float | None:
    """One round's added cost per tool round (ms): (latency p50 with K rounds −
    with 0) / K − the tool alone (an MCP client's call round trip, p50)."""
    runs = record.get("runs") or {}
    k = int(record.get("rounds") or 0)
    with_k = _get("latency_us.p50")(runs.get(str(k)) or {})
    without = _get("latency_us.p50")(runs.get("0") or {})
    alone = _get("call_ms.p50")(record.get("tool_alone") or {})
    if not k or with_k is None or without is None or alone is None:
        return None
    return (with_k - without) / 1000.0 / k - alone


def _tools_get(path: str, rounds: str) -> Getter:
    inner = _get(path)

    def get(record: dict[str, Any]) -> float | None:
        runs = record.get("runs") or {}
        key = str(record.get("rounds")) if rounds == "k" else rounds
        return inner(runs.get(key) or {})

    return get


def _session_rows(data: Data, plan: dict[str, Any],
                  row: Callable[[str, str, str, str, str], None]) -> None:
    """Issue 20's session scenarios (clawbus only), when they ran."""
    scenarios = data.scenarios()
    if HISTORY in scenarios:
        ttft50 = _get("ttft_ms.p50")
        u, cb = (data.med(s, HISTORY, ttft50) for s in ("upstream", "clawbus"))
        n, turns = plan.get("history_sessions", 16), plan.get("session_turns", 20)
        row(f"TTFT p50, stream 32 × 20 ms, c=1, in sessions holding {turns}+ turns "
            f"({n} sessions round robin; clawbus only) (ms)", _num(u, 2), _num(cb, 1), "—", "")
        row(f"**added** TTFT p50, c=1, sessions of {turns}+ turns (ms)", "",
            _signed(data.added("clawbus", HISTORY, ttft50)), "—", "")
    if HOT in scenarios:
        clients = plan.get("hot_clients", 8)
        turns = data.med("clawbus", HOT, _get("rps"))
        row(f"hot session: {clients} clients, one session key, turns/s (clawbus only)", "",
            _num(turns, 0), "—", "")
        p50 = data.med("clawbus", HOT, _get("order.gap_ms.p50"))
        p99 = data.med("clawbus", HOT, _get("order.gap_ms.p99"))
        row("… gap: a turn's upstream response end → the next turn's upstream request, "
            "p50 / p99 (ms)", "", f"{_num(p50, 2)} / {_num(p99, 2)}", "—", "")
        row("… its CPU per turn (ms)", "", _num(data.med("clawbus", HOT,
                                                          _get("cpu_ms_per_request")), 2),
            "—", "")
        row("… served one at a time, in order, each with the turns before it", "",
            _order_text(data), "—", "")
    if TOOLS in scenarios:
        k = next((int(r["rounds"]) for r in data.records if r["scenario"] == TOOLS), 0)
        lat = [data.med("clawbus", TOOLS, _tools_get("latency_us.p50", key))
               for key in ("0", "k")]
        ms = [None if v is None else v / 1000.0 for v in lat]
        row(f"agent tool loop, non-streaming c=1 latency p50 with 0 / {k} tool rounds "
            "(ms; clawbus only)", "", f"{_num(ms[0], 2)} / {_num(ms[1], 2)}", "—", "")
        alone = data.med("clawbus", TOOLS, _get("tool_alone.call_ms.p50"))
        added = data.med("clawbus", TOOLS, tool_round_added)
        row(f"… **added** per tool round (ms): ({k} rounds − 0) / {k} − the tool alone "
            f"({_num(alone, 2)} ms: an MCP client's call round trip)", "", _signed(added),
            "—", "")
        gap = data.med("clawbus", TOOLS, _tools_get("round_gap_ms.p50", "k"))
        row("… a round as the upstream sees it: tool call's response end → the request "
            "with its result, p50 (ms)", "", _num(gap, 2), "—", "")
        cpu = [data.med("clawbus", TOOLS, _tools_get("cpu_ms_per_request", key))
               for key in ("0", "k")]
        per_round = None if None in cpu else ((cpu[1] or 0.0) - (cpu[0] or 0.0)) / k
        row("… CPU per request with 0 / k rounds, and per round (ms)", "",
            f"{_num(cpu[0], 2)} / {_num(cpu[1], 2)}, {_num(per_round, 2)}", "—", "")


def _order_text(data: Data) -> str:
    bad: list[str] = []
    for record in data.records:
        if record["scenario"] != HOT:
            continue
        order = record.get("order") or {}
        problems = [f"{order.get(key)} {label}" for key, label in (
            ("overlaps", "overlapping"), ("history_mismatches", "out of order"),
            ("duplicates", "served twice")) if order.get(key)]
        if problems:
            bad.append(f"round {record['round']}: " + ", ".join(problems))
    return "yes, every round" if not bad else "**no** (" + "; ".join(bad) + ")"


def _session_targets(data: Data, add: Callable[[str], None],
                     verdict: Callable[[bool | None], str]) -> None:
    """Issue 20's targets, for the scenarios that ran (clawbus only)."""
    scenarios = data.scenarios()
    if "sessions_c16" in scenarios:
        rps = _get("rps")
        stateless = data.med("clawbus", "rps_c16", rps)
        stateful = data.med("clawbus", "sessions_c16", rps)
        ok = None if not stateless or stateful is None else stateful >= 0.6 * stateless
        add(f"| stateful req/s at c=16 (64 sessions) ≥ 0.6× stateless (clawbus only) | "
            f"{_ratio(stateful, stateless)} ({_num(stateful, 0)} vs {_num(stateless, 0)}) | "
            f"{verdict(ok)} |")
        cpu = data.med("clawbus", "sessions_c16", _get("cpu_ms_per_request"))
        add(f"| CPU per stateful request ≤ 1.4 ms (clawbus only) | {_num(cpu, 2)} ms | "
            f"{verdict(None if cpu is None else cpu <= 1.4)} |")
    if HISTORY in scenarios:
        added = data.added("clawbus", HISTORY, _get("ttft_ms.p50"))
        add(f"| added TTFT p50 at c=1 in a session of 20+ turns ≤ 3 ms (clawbus only) | "
            f"{_signed(added)} ms | {verdict(None if added is None else added <= 3.0)} |")
    if HOT in scenarios:
        p50 = data.med("clawbus", HOT, _get("order.gap_ms.p50"))
        p99 = data.med("clawbus", HOT, _get("order.gap_ms.p99"))
        in_order = _order_text(data).startswith("yes")
        ok = None if p50 is None or p99 is None else p50 <= 2.0 and p99 <= 2.0 and in_order
        add(f"| hot session: gap between turns p50 and p99 ≤ 2 ms, turns in order "
            f"(clawbus only) | {_num(p50, 2)} / {_num(p99, 2)} ms, in order: "
            f"{'yes' if in_order else 'no'} | {verdict(ok)} |")
    if TOOLS in scenarios:
        added = data.med("clawbus", TOOLS, tool_round_added)
        add(f"| added cost per agent tool round ≤ 2 ms (clawbus only) | {_signed(added)} ms | "
            f"{verdict(None if added is None else added <= 2.0)} |")


def _targets(data: Data, plan: dict[str, Any], peer: bool, add: Callable[[str], None]) -> None:
    add("**Targets**" + ("" if peer else
                         " — without `--peer litellm` the throughput target is "
                         "checked against the reference LiteLLM figure"))
    add("")
    add("| target | measured | met |")
    add("|---|---|:-:|")

    def verdict(ok: bool | None) -> str:
        return "—" if ok is None else ("yes" if ok else "**no**")

    rps = _get("rps")
    cb = data.med("clawbus", "rps_c16", rps)
    ll = data.med("litellm", "rps_c16", rps) if peer else LITELLM_REF["rps_c16"]
    ok = None if cb is None or ll is None else cb >= 10 * ll
    add(f"| non-streaming req/s at c=16 ≥ 10× LiteLLM | {_ratio(cb, ll)} "
        f"({_num(cb, 0)} vs {_num(ll, 0)}) | {verdict(ok)} |")
    lat = data.added("clawbus", "rps_c1", _get("latency_us.p50"))
    lat = None if lat is None else lat / 1000.0
    add(f"| added latency p50 at c=1 ≤ 1.5 ms (non-streaming) | {_signed(lat)} ms | "
        f"{verdict(None if lat is None else lat <= 1.5)} |")
    for c, limit in ((1, 2.0), (64, 10.0)):
        added = data.added("clawbus", f"ttft_c{c}", _get("ttft_ms.p50"))
        wave = data.added("clawbus", f"ttft_c{c}", _get("first_wave_ttft_ms.p50"))
        herd = (f" (first wave, {c} opened at once: {_signed(wave)} ms)"
                if c > 1 and wave is not None else "")
        add(f"| added TTFT p50 at c={c} ≤ {limit:g} ms | {_signed(added)} ms{herd} | "
            f"{verdict(None if added is None else added <= limit)} |")
    held = [n for n in plan["held"] if f"held_{n}" in data.scenarios()]
    rounds = data.per_round("clawbus", "held_2000", _get("on_time_fraction"))
    if rounds:
        # Every round must be on time: a median would hide a round that missed.
        worst = max(data.per_round("clawbus", "held_2000", _get("lateness_ms.max")).values(),
                    default=None)
        detail = (f" (worst stream {_num(worst, 0)} ms late; slack "
                  f"{_num(plan.get('slack_ms', 100.0), 0)} ms)" if worst is not None else "")
        by_round = ", ".join(_pct(rounds[r]) for r in sorted(rounds))
        add(f"| 2,000 concurrent streams (20 × 500 ms) on time | {by_round} by round{detail} | "
            f"{verdict(min(rounds.values()) >= 1.0)} |")
    else:
        largest = max(held) if held else None
        got = (data.med("clawbus", f"held_{largest}", _get("on_time_fraction"))
               if largest else None)
        add("| 2,000 concurrent streams (20 × 500 ms) on time | not run"
            + (f" (largest run: {largest} streams, {_pct(got)} on time)" if largest else "")
            + " | — |")
    rss = data.med("clawbus", "idle_rss", _get("rss_bytes"))
    mib = None if rss is None else rss / MiB
    add(f"| idle RSS of all processes ≤ 150 MiB | {_num(mib, 0)} MiB | "
        f"{verdict(None if mib is None else mib <= 150)} |")
    _session_targets(data, add, verdict)
    add("")


def scaling_plan(plan: dict[str, Any]) -> list[tuple[int, int]]:
    """(gateways, workers) of each scaling run; older results listed only worker counts."""
    if "scaling" in plan:
        return [(int(g), int(w)) for g, w in plan["scaling"]]
    return [(1, int(w)) for w in plan.get("scaling_workers", [])]


def _scaling(data: Data, plan: dict[str, Any], add: Callable[[str], None]) -> None:
    def scenario(gateways: int, workers: int) -> str:
        if "scaling" not in plan:  # older results: one gateway, named by workers only
            return f"scaling_w{workers}"
        return f"scaling_g{gateways}_w{workers}"

    pairs = [pair for pair in scaling_plan(plan) if scenario(*pair) in data.scenarios()]
    if not pairs:
        return
    rps = _get("rps")
    base_pair = (1, 1) if (1, 1) in pairs else pairs[0]
    base = data.med("clawbus", scenario(*base_pair), rps)
    add("**Scaling** — `clawbus up --gateways G --workers N` (G gateway processes sharing the "
        "port via SO_REUSEPORT), unpinned (both CPUs, shared with the upstream and `wrk`), "
        "non-streaming, c=64")
    add("")
    add(f"| gateways | workers | req/s | vs {base_pair[0]}×{base_pair[1]} | latency p50 (ms) "
        "| CPU used (cores) |")
    add("|---:|---:|---:|---:|---:|---:|")
    for gateways, workers in pairs:
        name = scenario(gateways, workers)
        value = data.med("clawbus", name, rps)
        p50 = data.med("clawbus", name, _get("latency_us.p50"))
        cores = data.med("clawbus", name, _get("system_cpu_share"))
        add(f"| {gateways} | {workers} | {_num(value, 0)} | {_ratio(value, base)} | "
            f"{_num(None if p50 is None else p50 / 1000.0, 1)} | {_num(cores, 2)} |")
    add("")


def _health(raw: dict[str, Any], data: Data, add: Callable[[str], None]) -> None:
    add("**Errors**")
    add("")
    failed: dict[str, int] = {}
    streams_failed: dict[str, int] = {}
    for record in data.records:
        if "error_count" not in record:
            continue
        target = streams_failed if "streams" in record else failed
        target[record["system"]] = target.get(record["system"], 0) + int(record["error_count"])
    harness = [r["harness_cpu_share"] for r in data.records
               if r["system"] != "upstream" and isinstance(r.get("harness_cpu_share"), float)]
    other = [r["other_cpu_share"] for r in data.records
             if isinstance(r.get("other_cpu_share"), float)]
    for system in sorted(set(failed) | set(streams_failed)):
        add(f"- {system}: {failed.get(system, 0)} failed non-streaming requests (wrk socket "
            f"errors + non-2xx), {streams_failed.get(system, 0)} failed or incomplete streams "
            "(all rounds; late but complete streams are not failures).")
    if harness:
        add(f"- Load generator + fake upstream used at most {max(harness):.2f} of a core "
            "during a run against a system (near 1.0 would mean the harness limited a result).")
    if other:
        add(f"- Other processes on the machine used {median(other) or 0:.2f} cores (median "
            f"over runs; max {max(other):.2f}) — well above 0 means a shared, noisy machine.")
    for message in raw.get("failures", []):
        add(f"- Harness failure: {message.splitlines()[0][:300]}")
    for system, problems in raw.get("problems", {}).items():
        add(f"- {system} logged {len(problems)} warning/error line(s); first: "
            f"`{problems[0][:200]}`")
    add("")
