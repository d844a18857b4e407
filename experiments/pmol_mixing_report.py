"""The markdown tables and the Pareto-front plot of experiments/pmol_mixing.py (from the rows
it writes to pmol_mixing.json, so `--replot` redoes them without training)."""
from __future__ import annotations

import shlex
import statistics

from moe_ext.utils.plots import _pyplot, _save


def methods(rows) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _of(rows, method):
    return [r for r in rows if r["method"] == method]


def mean_std(values) -> str:
    values = list(values)
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def mean_points(rs, key: str, pair, sweeps: str = "sweeps") -> list[tuple[float, float]]:
    """The sweep's points averaged over seeds, mix by mix."""
    sweeps = [r[sweeps][key]["points"] for r in rs]
    return [tuple(statistics.mean(s[i]["scores"][p] for s in sweeps) for p in pair)
            for i in range(len(sweeps[0]))]


def markdown(rows, facts, groups, pairs) -> str:
    a = facts["args"]
    seeds = sorted({r["seed"] for r in rows})
    base = a["model"] or (f"the built-in tiny Llama (width {a['hidden']}, {a['layers']} layers, "
                          "random init)")
    lines = [
        "# PMoL on generations: preference mixes, Pareto fronts, baselines", "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores (shared with other jobs), torch "
        f"{facts['torch']}" + (f", transformers {facts['transformers']}" if "transformers" in facts else "")
        + f". Commit {facts['commit']}, "
        f"{facts['date']}, {facts['seconds']} s in all.  ",
        "Command: `" + shlex.join([".venv/bin/python", "experiments/pmol_mixing.py"]
                                + facts.get("argv", [])) + "`", "",
        f"World: moe_ext.pmol.mixing_world, {a['train_size']} training and {a['eval_size']} held-out "
        f"pairs per preference ({', '.join(groups)})"
        + (f", {a['unmarked']:.0%} of the training prompts without their preference's marker"
           if a.get("unmarked") else "")
        + f". Base: {base}, then SFT on both responses for "
        f"{a['sft_steps']} steps. Every method: DPO (beta {a['beta']}) + RPO (alpha {a['rpo_alpha']}), "
        f"AdamW lr {a['lr']}, batch {a['batch_size']}, {a['steps']} steps (Rewarded Soups: "
        f"{a['steps'] // len(groups)} per preference LoRA), expert rank {a['rank']}"
        + (f"; steerable PMoL: mixes ~ Dirichlet({a['mix_alpha']}) per pair, "
           f"{a['mix_none_prob']:.0%} of the pairs without a mix"
           + "".join(f", {k.replace('_', ' ')} {v}" for k, v in facts.get("steerable_overrides", {}).items())
           if "mix_alpha" in a else "")
        + ". Replies sampled "
        f"at temperature {a['temperature']}, at most {a['max_new_tokens']} tokens, scored by "
        "moe_ext.pmol.scorers. Mean ± std over seeds " + ", ".join(map(str, seeds)) + ".", "",
        "## Conditioned: held-out prompts carrying a preference's marker", "",
        "Mean score of each preference's own scorer on the replies to its prompts; DPO accuracy "
        "and group routing accuracy on the held-out pairs (routing: the group with the most "
        "router mass over the prompt is the pair's preference).", "",
        "| method | trainable params | train s | " + " | ".join(groups) + " | DPO acc | routing acc |",
        "|---|---|---|" + "---|" * len(groups) + "---|---|"]
    for m in methods(rows):
        rs = _of(rows, m)
        ev = [r.get("eval", {}).get("all", {}) for r in rs]
        dpo = mean_std(e["dpo_accuracy"] for e in ev) if ev[0] else "-"
        route = mean_std(e["routing_accuracy"] for e in ev) if "routing_accuracy" in ev[0] else "-"
        lines.append(f"| {m} | {rs[0]['params']} | {statistics.mean(r['seconds'] for r in rs):.0f} | "
                     + " | ".join(mean_std(r["conditioned"][g] for r in rs) for g in groups)
                     + f" | {dpo} | {route} |")
    lines += ["", "## Routing accuracy per preference (held-out pairs)", "",
              "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for m in methods(rows):
        rs = _of(rows, m)
        if "routing_accuracy" in rs[0].get("eval", {}).get(groups[0], {}):
            lines.append(f"| {m} | " + " | ".join(mean_std(r["eval"][g]["routing_accuracy"] for r in rs)
                                                   for g in groups) + " |")
    lines += ["", "## Steered: neutral prompts, the mix of a conflicting pair swept", "",
              f"{a['points']} mixes from all-first to all-second (mixtures: group bias "
              "strength * log(weight), strength 1 unless the row says `bias xS`, other groups at "
              "weight 0.001, the null expert unbiased; steerable PMoL: the mix is the routers' "
              "input, other groups at weight 0; Rewarded Soups: "
              "interpolation weights of the two preferences' LoRAs; single LoRA and SFT base: "
              "one unsteered point). Hypervolume of the seed's sweep above (0, 0); steering "
              "range: a preference's score at its own end minus at the other end; monotone "
              "seeds: on how many seeds each score never moved against the sweep from one mix "
              "to the next.", ""]
    lines += sweep_tables(rows, pairs, "sweeps")
    lines += ["## Steered: the pair's own held-out prompts, which carry their markers", "",
              "The same sweeps on the held-out prompts of the two preferences (half of each): "
              "can steering override what the prompt asks for?", ""]
    lines += sweep_tables(rows, pairs, "marked_sweeps")
    lines += ["## Unsteered replies to neutral prompts", "",
              "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for m in methods(rows):
        rs = _of(rows, m)
        lines.append(f"| {m} | " + " | ".join(mean_std(r["neutral"][g] for r in rs) for g in groups) + " |")
    lines.append("")
    return "\n".join(lines)


def sweep_tables(rows, pairs, sweeps: str) -> list[str]:
    """Per pair: each method's hypervolume, steering ranges and mean sweep points."""
    lines = []
    for pair in pairs:
        key = "/".join(pair)
        lines += [f"### {pair[0]} vs {pair[1]}", "",
                  f"| method | hypervolume | range {pair[0]} | range {pair[1]} | monotone seeds "
                  f"{pair[0]}, {pair[1]} | mean points ({pair[0]}, {pair[1]}), all-{pair[0]} first |",
                  "|---|---|---|---|---|---|"]
        for m in methods(rows):
            rs = _of(rows, m)
            sw = [r[sweeps][key] for r in rs]
            pts = " ".join(f"({x:.2f}, {y:.2f})" for x, y in mean_points(rs, key, pair, sweeps))
            lines.append(f"| {m} | {mean_std(s['hypervolume'] for s in sw)} | "
                         f"{mean_std(s['steering_range'][pair[0]] for s in sw)} | "
                         f"{mean_std(s['steering_range'][pair[1]] for s in sw)} | "
                         f"{monotone(sw, pair)} | {pts} |")
        lines.append("")
    return lines


def monotone(sweeps, pair) -> str:
    """"k/n, k/n": on how many of the n seeds each score was monotone along the sweep
    ("-" for summaries written before monotonicity was recorded, or one-point sweeps)."""
    if "monotone" not in sweeps[0] or len(sweeps[0]["points"]) < 2:
        return "-"
    return ", ".join(f"{sum(s['monotone'][p] for s in sweeps)}/{len(sweeps)}" for p in pair)


def plot_fronts(rows, pairs, path: str, sweeps: str = "sweeps", prompts: str = "neutral prompts"):
    """One panel per pair: each method's sweep (mean over seeds), its points joined in mix order."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs) + 3, 4.8))
    for ax, pair in zip(axes, pairs):
        key = "/".join(pair)
        for m in methods(rows):
            pts = mean_points(_of(rows, m), key, pair, sweeps)
            xs, ys = zip(*pts)
            if len(pts) == 1:
                ax.plot(xs, ys, marker="*" if "LoRA" in m else "x", ms=12, ls="", label=m)
            else:
                line, = ax.plot(xs, ys, marker="o", ls="--" if "bias x" in m else "-", label=m)
                ax.annotate(f"all {pair[0]}", pts[0], fontsize=7, color=line.get_color())
        ax.set_xlabel(f"{pair[0]} score")
        ax.set_ylabel(f"{pair[1]} score")
        ax.set_title(f"{pair[0]} vs {pair[1]}, {prompts}: sweeps (mean over seeds)", fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(plt, fig, path)
