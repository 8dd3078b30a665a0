"""The paper's Table 4 (running time), measured on this run's data, model and machine.

    python timings.py smollm2_135M --num_fold 2 --out_dir validation --kappa best --out paper/table4_smollm2_135M.md
    python timings.py llama_7B --device 0 --num_fold 2 --kappa 40 --out paper/table4_llama_7B.md --repeats 5

Reads stage 1 as ot_edit_layer.py does (the activation cache, each fold's
probes and the edited layer, trained or extracted where missing), then, on
fold --fold (default 0), times with slim.paper.timing: stage 1's probes of the
edited layer (its H heads, the run's loss and epochs, the fold's train rows,
validated on its val rows), one head's OT map (the head flagging the most
rows) and all the layer's maps (the run's gamma and covariance), ITI's fit
of one layer for comparison (--no_iti skips it), and the inference overhead
of the fold's SLIM policy on the first --n_questions_timed test questions,
answered as the pipeline answers them (shared-prompt cache, stop at the
answer, --answer_batch_size at a time), each batch plain and edited back to
back, the order alternating. Every timing runs once untimed, then --repeats
times. Writes the markdown table to --out and a JSON beside it; the paper's
LLaMA-7B figures are quoted in their own column. A table already at --out,
measured by the same command with the same configuration on the same device
and torch, is kept (a resumed reproduce.sh redoes no finished stage);
--remeasure times it again.
"""

import argparse
import os
import shlex
import sys
import time

import torch

import slim_utils as su
from slim.answering.prompts import qa_prompt
from slim.config import COVARIANCES, PSI, ParameterError, SlimConfig, check_int, run_config
from slim.data.activations import load_probe_data
from slim.data.folds import questions_and_folds
from slim.io import artefact_lock
from slim.models.loading import resolve_device
from slim.paper.overhead import answer_setup, paired_overhead, timed_questions
from slim.paper.table4 import device_description, earlier_table4, table4_components, write_table4
from slim.paper.timing import (
    PAPER_TABLE4,
    busiest_head,
    time_head_map,
    time_iti_layer,
    time_layer_maps,
    time_layer_probes,
)
from slim.policies.base import model_fingerprint
from slim.policies.fit import fold_layer_activations, slim_for_fold
from slim.stage1.fit import chosen_layers, fit_stage1

# the answering flags of the evaluating scripts that decide how questions are answered (the judges' flags are
# accepted, unused: nothing is scored)
ANSWER_FLAGS = ("--max_new_tokens", "--answer_batch_size", "--answer_rule", "--no_prefix_cache", "--no_stop_at_answer")


def main():
    parser = su.add_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]), su.COMMON_FLAGS)
    su.add_flags(parser, su.PROBE_FLAGS, [f for f in su.EVAL_FLAGS if f[0] in ANSWER_FLAGS])
    parser.add_argument(
        "--alpha", type=float, default=0.1, help="gamma: the chance constraint's tolerance, in (0, 0.5)"
    )
    parser.add_argument("--kappa", default="40", help="aggregation strength, or 'best': the value sweep.sh chose")
    parser.add_argument("--psi", default="identity", choices=PSI, help="aggregation function of kappa * p * v")
    parser.add_argument("--cov", default="empirical", choices=COVARIANCES, help="the flagged activations' covariance")
    parser.add_argument(
        "--min_samples", type=int, default=None, help="fewer flagged activations: identity map (ot_edit_layer.py)"
    )
    parser.add_argument("--fold", type=int, default=0, help="the fold whose data, probes and policy are timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each component (after one warm-up)")
    parser.add_argument("--n_questions_timed", type=int, default=32, help="test questions answered both ways")
    parser.add_argument("--no_iti", dest="iti", action="store_false", help="skip ITI's fit (for comparison)")
    parser.add_argument("--out", default=None, help="markdown table (default <out_dir>/table4_<run>.md); JSON beside")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="time again even when --out holds a table measured by the same command, configuration, device and torch "
        "(kept by default, as a rerun keeps every finished stage)",
    )
    args = su.accept_shared(parser).parse_args()
    check_int("repeats", args.repeats, 1)
    check_int("n_questions_timed", args.n_questions_timed, 1)
    data_cfg, probe_cfg = su.data_config(args), su.probe_config(args)
    layout = su.run_layout(args)
    cfg = SlimConfig(
        args.alpha, su.knob(args.kappa, layout, "slim", "kappa"), args.psi, args.cov, args.min_samples, args.criterion
    )
    if not 0 <= args.fold < data_cfg.num_fold:
        raise ParameterError("fold", f"must lie in 0..{data_cfg.num_fold - 1}, got {args.fold}.")
    command = shlex.join(["python", *sys.argv])
    config = run_config(model=su.model_settings(args), data=data_cfg, probe=probe_cfg, slim=cfg)
    device = device_description("auto" if args.device == "auto" else resolve_device(args.device))
    out = args.out or layout.out_dir / f"table4_{layout.tag}.md"
    kept = None if args.remeasure else earlier_table4(out, command, device, config)
    if kept:  # a rerun (a resumed reproduce.sh) keeps what was measured: timing again would redo finished work
        when = kept["header"]["date"]
        print(f"Table 4 kept: {out}, measured {when} by this command on this device (--remeasure: time it again)")
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    df, folds = questions_and_folds(data_cfg, layout.splits_dir)
    load = su.model_loader(args)
    data = load_probe_data(df, data_cfg.dataset_name, layout, load, args.batch_size, verify=args.verify)
    fold_probes = fit_stage1(data, folds, probe_cfg, layout, data_cfg.dataset_name, su.compute_device(args, load))
    fold, split = args.fold, folds[args.fold]
    layer, probes = chosen_layers(fold_probes, cfg.criterion)[fold], fold_probes[args.fold]
    lm = load()
    print(f"fold {fold}: layer {layer} (tau {int(probes.tau[layer])}); timing, {args.repeats} repeats each")

    train_rows, val_rows = data.rows_of(split["train"]), data.rows_of(split["val"])
    labels = data.texts["label"].to_numpy()
    t_probes = time_layer_probes(
        data.activations, labels, train_rows, val_rows, layer, probe_cfg, su.compute_device(args, load), args.repeats
    )
    acts_layer, _ = fold_layer_activations(data, split, layer)
    weight, bias = probes.weight[layer], probes.bias[layer]
    head = busiest_head(acts_layer, weight, bias)
    t_head = time_head_map(acts_layer, weight, bias, head, cfg, args.repeats)
    t_maps = time_layer_maps(acts_layer, weight, bias, cfg, args.repeats)
    t_iti = None
    if args.iti:
        truthful = data.texts["truthful"].to_numpy()
        t_iti = time_iti_layer(data.activations, truthful, train_rows, val_rows, layer, "com", args.repeats)

    maps = layout.maps(fold, layer, cfg, probe_cfg)
    with artefact_lock(maps):  # fitted by one run; another run waiting here reads them back
        policy = slim_for_fold(acts_layer, probes, layer, cfg, maps, model_fingerprint(lm.model))
    questions = timed_questions(df, split["test"], args.n_questions_timed)
    prefix, stop = answer_setup(lm, questions, args.prefix_cache, args.stop_at_answer)
    on_gpu = str(lm.device).startswith("cuda")
    overhead = paired_overhead(
        lm,
        [qa_prompt(q) for q in questions["Question"]],
        policy,
        batch_size=args.answer_batch_size,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        prefix=prefix,
        stop_at_answer=stop,
        answer_rule=args.answer_rule,
        time_edit=not on_gpu,  # a GPU clock inside the edit would see only the kernel launches
    )

    components = table4_components(t_probes, t_head, overhead, t_maps, t_iti)
    totals = overhead.totals()
    header = {
        "title": f"Table 4: running time, {layout.tag} (this run)",
        "command": command,
        "date": started,
        "model": f"{args.model_name}" + (f" from {args.model_dir}" if args.model_dir else "") + f" (run {layout.tag})",
        "device": device,
        "load average (1 min) at the start": "n/a" if load_average is None else f"{load_average:.2f}",
        "torch": torch.__version__,
        "edited layer": f"{layer} of fold {fold} (tau {policy.tau} of {weight.shape[0]} heads), kappa {cfg.kappa:g}, "
        f"gamma {cfg.gamma:g}, cov {cfg.cov}",
    }
    notes = [
        f"Probe for one layer: stage 1's trainer on layer {layer}'s {t_probes.meta['heads']} heads, "
        f"{t_probes.meta['train_rows']} train rows validated every epoch on {t_probes.meta['val_rows']} val rows, "
        f"{probe_cfg.loss_type} loss, {probe_cfg.epochs} epochs, on {t_probes.meta['device']}.",
        f"One head: head {head} (the most flagged rows: {t_head.meta['flagged_rows']} of {t_head.meta['rows']}; "
        f"map {t_head.meta['status']}), closed-form solve (slim.policies.gaussian_ot, numpy on the "
        "CPU), not an SDP solver as in the paper.",
        f"Inference: {len(overhead.prompts)} test questions of fold {fold}, batches of {args.answer_batch_size}, up "
        f"to {args.max_new_tokens} new tokens, shared-prompt cache {'on' if prefix is not None else 'off'}, stop "
        f"at the answer {'on' if stop else 'off'}; each batch plain and edited back to back, the order "
        f"alternating; median over pairs. Decoded tokens a pass: {totals['plain_tokens']:.0f} plain, "
        f"{totals['edited_tokens']:.0f} edited; {overhead.same}/{len(overhead.prompts)} continuations unchanged "
        f"by the edit; increase of the summed times {totals['mean_increase_pct']:+.2f} %.",
        "Headline: the per-decoded-token increase (the edit's computation, whatever it does to the answers' "
        "length); the whole-answer row also counts the answers getting longer or shorter.",
        f"The paper's column is quoted from its Table 4 ({PAPER_TABLE4['model']}, "
        f"{PAPER_TABLE4['hardware']}); it was not measured here.",
    ]
    if overhead.firing_rate is not None:
        notes.append(f"SLIM's layer fired at {100 * overhead.firing_rate:.1f} % of the timed edited positions.")
    details = {
        "config": config,
        "fold": fold,
        "layer": layer,
        "tau": policy.tau,
        "head": head,
        "overhead": {
            "questions": len(overhead.prompts),
            "batch_size": args.answer_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "prefix_cache": prefix is not None,
            "stop_at_answer": stop,
            "answer_rule": args.answer_rule,
            "same_continuations": overhead.same,
            "firing_rate": overhead.firing_rate,
            "totals": totals,
            "pairs": overhead.pairs,
        },
    }
    with artefact_lock(out):
        md, js = write_table4(out, header, components, notes, details)
    for c in components:
        print(f"{c['component']}: {c['median']:.4g} {c['unit']} (min {c['min']:.4g}, max {c['max']:.4g}, n {c['n']})")
    print(f"table: {md}\njson: {js}")


if __name__ == "__main__":
    su.run_main(main, flags={"gamma": "--alpha"})
