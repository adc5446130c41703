"""Plant small, realistic bugs one at a time in a copy of the repository and check that the tests
catch each of them.

    python tests/plant_bugs.py                 # every bug (a few minutes on 2 CPU cores)
    python tests/plant_bugs.py ncut_restarts   # only the named bugs
    python tests/plant_bugs.py -j 4            # four bugs at a time, each in its own copy
    python tests/plant_bugs.py --list

The repository (tracked and untracked, non-ignored files) is copied to a temporary folder; the
named tests are first run there unchanged (they must pass, else nothing can be concluded), then
for each bug the file is edited (the exact `old` snippet must occur once), its tests run with
OMP_NUM_THREADS=1, and the file is restored. One line per bug:
    caught              a test failed
    SURVIVED            every test passed: a behaviour no test pins
    SNIPPET NOT FOUND   the code changed: update the snippet, so the list stays in step
    ERROR               pytest could not run the tests (a stale test id, a broken plant)
Exits non-zero unless every bug is caught. Not part of the test suite (not named test_*.py).
"""
import argparse
import concurrent.futures
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

P = "tests/test_pins.py::"
PT = "tests/test_pins_train.py::"
NCUT = [P + "test_ncut_value_by_hand", P + "test_ncut_reaches_the_exhaustive_optimum_on_hard_cases"]
FW = [P + "test_frank_wolfe_first_step_is_the_exact_line_search", P + "test_frank_wolfe_alone_descends_to_the_optimum"]
BCL_STEP = [PT + "test_bcl_step_matches_a_direct_computation"]
R = "tests/test_repro.py::"
NG = "tests/test_num_groups.py::"
DG = "tests/test_diag.py::"
PL = "tests/test_plot_runs.py::"
C = "tests/test_contract.py::"
LOOP = [PT + "test_lr_batches_augmentations_and_sgd_steps_as_main_runs_them"]
DIST = ["tests/test_distributed.py::test_two_processes_end_with_the_weights_of_one"]
M = "tests/test_moo.py::"

# (name, file, old snippet, new snippet, test ids). Snippets come from code that is unlikely to
# be rewritten; the ones inside train_one_epoch are kept to a single expression.
BUGS = [
    # NCut (Eq. 8-9)
    ("ncut_no_plus_one_shift", "gbg.py",
     "W = np.clip((A + A.T) / 2 + 1.0, 0.0, None)",
     "W = np.clip((A + A.T) / 2, 0.0, None)", NCUT),
    ("ncut_groups_without_shift", "gbg.py",
     "    W = _graph_weights(affinity)\n    K = W.shape[0]",
     "    W = np.clip(_graph_weights(affinity) - 1.0, 0.0, None)\n    K = W.shape[0]", NCUT),
    ("ncut_no_unit_rows", "gbg.py",
     "    U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)\n", "", NCUT),
    ("ncut_restarts", "gbg.py",
     "for _ in range(max(n_init, 1)):", "for _ in range(1):", NCUT),
    # Frank-Wolfe alone (the active-set polish would hide these)
    ("fw_curvature_sign", "gbg.py",
     "curv = M[s, s] + M[v, v] - 2.0 * M[s, v]", "curv = M[s, s] + M[v, v] + 2.0 * M[s, v]", FW),
    ("fw_line_search_half_step", "gbg.py",
     "gamma = min(a[v], gap / curv) if curv > 0 else a[v]",
     "gamma = min(a[v], 0.5 * gap / curv) if curv > 0 else a[v]", FW),
    ("fw_stale_gradient", "gbg.py",
     "Ma += gamma * (M[s] - M[v])", "Ma += gamma * (M[s] - M[v]) * 0.5", FW),
    # GAC beta (the reading of the appendix in results/README.md)
    ("gac_delta_not_relative", "gbg.py",
     "delta = math.log(n.max() / n.min()) / log_span if log_span > 0 else 0.0",
     "delta = math.log(n.max() / n.min()) if log_span > 0 else 0.0", [P + "test_gac_class_probs_by_hand"]),
    ("gac_beta_formula", "gbg.py",
     "beta = rho + lam * delta", "beta = rho * (1 + lam * delta)", [P + "test_gac_class_probs_by_hand"]),
    # Many / Medium / Few
    ("shots_divide_by_whole_split", "train.py",
     "correct[m].sum().item() / total[m].sum().item()", "correct[m].sum().item() / total.sum().item()",
     [P + "test_evaluate_many_medium_few_against_a_hand_count"]),
    # model selection
    ("best_on_test_epoch", "train.py",
     'stats["val_top1"] > best["val_top1"]', 'stats["test_top1"] > best["test_top1"]',
     [PT + "test_best_on_val_is_the_val_argmax_not_the_test_one"]),
    # BCL's step
    ("bcl_no_logit_adjustment", "train.py",
     "adjusted = logits + model.log_prior", "adjusted = logits", BCL_STEP),
    ("bcl_la_weight_not_on_direction", "train.py",
     "p.grad.mul_(la)", "p.grad.mul_(1.0)", BCL_STEP),
    ("bcl_cosine_scale", "train.py",
     "def __init__(self, in_features, out_features, scale=30.0):",
     "def __init__(self, in_features, out_features, scale=16.0):", BCL_STEP),
    ("bcl_contrast_not_divided_by_processes", "train.py",
     "bcl_contrast(model, z, y, args.bcl_temp) / args.world_size",
     "bcl_contrast(model, z, y, args.bcl_temp)", BCL_STEP),
    # defaults
    ("default_normalize", "train.py",
     '    normalize="l2",', '    normalize="none",',
     [P + "test_defaults_quoted_in_readme"]),
    ("default_group_loss", "train.py",
     '    group_loss="class",', '    group_loss="sample",',
     [P + "test_defaults_quoted_in_readme"]),
    ("preset_inat_wd", "train.py",
     '"inat2018": dict(arch="resnet50", epochs=100, lr=0.2, wd=1e-4,',
     '"inat2018": dict(arch="resnet50", epochs=100, lr=0.2, wd=5e-4,', [P + "test_defaults_quoted_in_readme"]),
    ("preset_bcl_cifar_weight", "train.py",
     '"cifar": dict(la_weight=2.0, bcl_weight=1.6, bcl_temp=0.1)',
     '"cifar": dict(la_weight=2.0, bcl_weight=0.6, bcl_temp=0.1)', [P + "test_defaults_quoted_in_readme"]),
    # grouping schedule and kind
    ("regroup_every_off_by_one", "train.py",
     "(epoch - args.group_epoch) % args.regroup_every == 0", "(epoch - args.group_epoch) % (args.regroup_every + 1) == 0",
     [PT + "test_group_epoch_and_regroup_every_end_to_end"]),
    ("group_epoch_ignored", "train.py",
     "due = epoch == args.group_epoch or", "due = epoch == 0 or",
     [PT + "test_group_epoch_and_regroup_every_end_to_end"]),
    ("sketch_threshold_20_gb", "train.py",
     "None if K * P * 4 <= 2e9 else 16384", "None if K * P * 4 <= 2e10 else 16384",
     [P + "test_sketch_switches_on_above_2_gb"]),
    ("sketch_size", "train.py",
     "None if K * P * 4 <= 2e9 else 16384", "None if K * P * 4 <= 2e9 else 8192",
     [P + "test_sketch_switches_on_above_2_gb"]),
    ("grouping_random_runs_ncut", "train.py",
     'if args.grouping == "random":', 'if args.grouping == "random-partition":',
     [PT + "test_random_grouping_end_to_end"]),
    # resume
    ("log_not_truncated_on_resume", "train.py",
     'lines = [l for l in log_lines(out / "log.txt") if json.loads(l)["epoch"] < start_epoch]',
     'lines = log_lines(out / "log.txt")', [PT + "test_resume_after_a_kill_between_log_and_checkpoint"]),
    ("log_partial_last_line_read", "train.py",
     'lines = [line for line in f if line.endswith("\\n")]', "lines = list(f)",
     [PT + "test_a_log_line_cut_short_is_dropped_on_resume"]),
    ("log_damaged_line_read", "train.py", "ok = False\n        if not ok:\n", "ok = False\n        if False:\n",
     [PT + "test_a_damaged_log_line_stops_the_resume_with_one_line_and_keeps_the_checkpoint"]),
    ("log_cut_in_place", "train.py",
     'replace_durably(out / "log.txt", lambda f: f.write("".join(lines).encode()))',
     '(out / "log.txt").write_text("".join(lines))',
     [PT + "test_a_kill_while_the_log_is_cut_to_the_checkpoint_leaves_it_whole"]),
    ("stale_results_kept_on_a_fresh_start", "train.py",
     '("log.txt", "log.txt.tmp", "groups.json", "results.json")', '("log.txt", "log.txt.tmp")',
     [PT + "test_a_fresh_start_removes_the_earlier_runs_outputs"]),
    ("cluster_flags_in_the_checkpoint", "slurm/submit.py",
     "return train_py.main(argparse.Namespace(**{k: v for k, v in vars(args).items() if k in flags}))",
     "return train_py.main(args)", ["tests/test_slurm.py::test_a_resubmission_with_other_cluster_flags_resumes"]),
    ("best_test_rebuilt_from_the_log", "train.py",
     'best_test = ckpt["best_test"]', 'best_test = best_test_in(out / "log.txt", start_epoch)',
     [PT + "test_resume_takes_best_test_from_the_checkpoint"]),
    # two processes against one (float64, 1e-10)
    ("global_bn_biased_running_var", "train.py",
     "self.running_var.lerp_(var.detach() * n / (n - 1), factor)",
     "self.running_var.lerp_(var.detach(), factor)",
     ["tests/test_distributed.py::test_two_processes_end_with_the_weights_of_one"]),
    ("evaluate_counts_not_summed_over_processes", "train.py",
     "correct, total = all_reduce_(correct).cpu(), all_reduce_(total).cpu()", "correct, total = correct.cpu(), total.cpu()",
     ["tests/test_distributed.py::test_two_processes_end_with_the_weights_of_one"]),
    # the MGDA step's update rule and the grouping's BatchNorm recalibration
    ("update_rule_not_scaled", "gbg.py",
     "w = (alpha / n) / max((alpha / n).sum(), 1e-300)", "w = alpha / n",
     ["tests/test_moo.py::test_update_size_equal_gradients_give_that_gradient",
      "tests/test_moo.py::test_mgda_backward_exact_matches_separate_backwards"]),
    # --moo-grad features (MGDA-UB): the classifier's part of the Gram, the z-Grams summed over
    # processes, the raw gradients' weights w in the one backward, train.py's Gram parameters
    ("features_gram_without_classifier", "gbg.py",
     "    gram = shared[:G * G].view(G, G) + rows @ rows.T", "    gram = shared[:G * G].view(G, G)",
     [M + "test_features_step_matches_separate_passes", M + "test_features_bound_on_random_networks"]),
    ("features_z_gram_not_summed_over_ranks", "gbg.py",
     "    _all_reduce(shared, process_group)  # sum of the z-Grams",
     "    _all_reduce(shared[G * G:], process_group)  # sum of the z-Grams",
     [M + "test_two_process_gloo_matches_one_process"]),
    ("features_backward_with_alpha", "gbg.py",
     "mgda_weights(gram, values, normalize=normalize, update=update)\n    weighted_backward(losses, w,",
     "mgda_weights(gram, values, normalize=normalize, update=update)\n    weighted_backward(losses, alpha,",
     [M + "test_features_step_matches_separate_passes"]),
    ("features_gram_never_has_fc", "train.py",
     'return fc if args.moo_gram == "all" else []', "return []",
     ["tests/test_step.py::test_features_step_matches_separate_passes"]),
    ("recalibration_running_average", "gbg.py",  # an exponential average, not the plain one
     "                                seen[1], m.eps)", "                                0.1, m.eps)",
     ["tests/test_grouping.py::test_recalibrated_bn_equals_exact_statistics_and_is_restored"]),
    ("recalibration_not_restored", "gbg.py",
     "            _restore_bn(saved_bn)", "            pass",
     ["tests/test_grouping.py::test_recalibrated_bn_equals_exact_statistics_and_is_restored"]),
    ("moo_every_ignored", "train.py",
     "if step % args.moo_every == 0 or", "if True or",
     ["tests/test_step.py::test_moo_every_reuses_the_weights_until_the_groups_change"]),
    ("min_norm_absolute_kkt_tolerance", "gbg.py",
     "if gaps[j] >= -tol * obj or S[j]:", "if gaps[j] >= -tol or S[j]:",
     ["tests/test_moo.py::test_min_norm_relative_to_the_optimum_when_norms_span_eight_orders"]),
    ("group_epoch_default_zero", "train.py",
     "args.group_epoch = warm if warm < args.epochs else 0", "args.group_epoch = 0",
     [P + "test_defaults_quoted_in_readme"]),
    # the step path: no host reads but the solver's; --amp on the CPU
    ("host_read_in_group_losses", "train.py",
     "class_counts=counts, validate=False)", "class_counts=counts)",
     ["tests/test_step.py::test_no_host_reads_on_the_step_path_but_the_solve"]),
    ("amp_only_on_cuda", "train.py",
     "with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):\n        z = ",
     "with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == \"cuda\"):\n        z = ",
     ["tests/test_step.py::test_amp_runs_the_network_in_bf16_on_the_cpu"]),
    # the number of groups from the spectrum, the grouping history (--num-groups auto, --regroup-every)
    # the gradient diagnostic (--diag-every) and the per-group training losses
    ("diag_local_counts", "gbg.py",
     "counts = count_labels(targets, K) if class_counts is None else torch.as_tensor(class_counts)",
     "counts = count_labels(targets, K)",
     [DG + "test_class_update_cosines_match_per_sample_gradients"]),
    ("diag_leaves_bn_updated", "train.py",
     "    model.load_state_dict(saved, strict=False)\n", "",
     [DG + "test_diagnostic_changes_nothing_in_the_training"]),
    ("group_loss_not_summed_over_ranks", "train.py",
     "l * args.world_size / n for l, n in group_loss.T.tolist()", "l / n for l, n in group_loss.T.tolist()",
     ["tests/test_distributed.py::test_two_processes_end_with_the_weights_of_one"]),
    ("num_groups_largest_gap", "gbg.py",
     '"num_groups": int(2 + significant.max()) if structured', '"num_groups": int(2 + np.argmax(gaps)) if structured',
     [NG + "test_eigengap_heuristic_stops_early_on_unequal_blocks"]),
    ("num_groups_null_of_first_gap", "gbg.py",
     "null[r] = _eigengaps(W, max_groups)[0].max()", "null[r] = _eigengaps(W, max_groups)[0][0]",
     [NG + "test_structureless_affinities_fall_back"]),
    ("ari_not_adjusted", "gbg.py",
     "expected = sum_a * sum_b / pairs(np.array([a.size]))", "expected = 0.0",
     [NG + "test_adjusted_rand_index_matches_pair_counting"]),
    ("history_lost_on_resume", "train.py",
     'groups_info = ckpt.get("groups_info")', "groups_info = None",
     [NG + "test_auto_groups_regroup_history_and_exact_resume"]),
    ("auto_chosen_again_after_resume", "train.py",
     '            args.num_groups = groups_info["num_groups"]', "            pass",
     [NG + "test_auto_groups_regroup_history_and_exact_resume"]),
    # the release's grouping (cluster_qr), BCL's head over three views and its initialisation, the
    # per-class MOO's memory check
    ("cluster_qr_without_degree_scaling", "gbg.py",
     "labels = _cluster_qr(U / np.sqrt(d)[:, None])", "labels = _cluster_qr(U)",
     ["tests/test_grouping.py::test_cluster_qr_equals_scikit_learn_spectral_clustering"]),
    ("release_preset_kmeans", "train.py",
     '               ncut_assign="cluster_qr")', '               ncut_assign="kmeans")',
     ["tests/test_train.py::test_release_preset_and_recipes"]),
    ("bcl_head_sees_contrastive_views_only", "train.py",
     "emb = F.normalize(model.head(z.to(model.fc.weight.dtype)), dim=1)[B:]",
     "emb = F.normalize(model.head(z[B:].to(model.fc.weight.dtype)), dim=1)",
     ["tests/test_bcl.py::test_head_batchnorm_sees_all_three_views"] + BCL_STEP),
    ("bcl_heads_default_init", "train.py",
     "    if D < 2048:\n        for layer in (*model.head, *model.head_fc):", "    if False:\n        for layer in (*model.head, *model.head_fc):",
     ["tests/test_bcl.py::test_heads_initialised_as_the_releases"]),
    ("class_objectives_memory_in_elements", "train.py",
     "need = rows * P * itemsize", "need = rows * P",
     ["tests/test_train.py::test_class_objectives_refused_when_their_gradients_cannot_fit"]),
    # the loop's bookkeeping as main runs it: lr per step, batches and augmentations per epoch, SGD
    ("lr_once_per_epoch", "train.py",
     'group["lr"] = lr_at(epoch + step / len(loader), args)', 'group["lr"] = lr_at(epoch, args)', LOOP),
    ("cosine_ignores_warmup", "train.py",
     "t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)", "t = epoch / args.epochs",
     LOOP),
    ("cosine_ends_an_epoch_early", "train.py",
     "max(args.epochs - args.warmup_epochs, 1e-8)", "max(args.epochs - 1 - args.warmup_epochs, 1e-8)", LOOP),
    ("same_batches_every_epoch", "train.py", "sampler.set_epoch(epoch)", "sampler.set_epoch(0)", LOOP),
    ("same_crops_every_epoch", "train.py", "seed=args.seed * 100003 + epoch,", "seed=args.seed * 100003,", LOOP),
    ("no_momentum", "train.py", "momentum=args.momentum, weight_decay=args.wd)", "weight_decay=args.wd)", LOOP),
    ("nesterov", "train.py", "momentum=args.momentum, weight_decay=args.wd)",
     "momentum=args.momentum, weight_decay=args.wd, nesterov=True)", LOOP),
    ("no_weight_decay_on_bn_and_biases", "train.py", "torch.optim.SGD(model.parameters(), lr=args.lr",
     'torch.optim.SGD([{"params": [p for p in model.parameters() if p.dim() > 1]}, {"params": [p for p in '
     'model.parameters() if p.dim() == 1], "weight_decay": 0.0}], lr=args.lr', LOOP),
    ("best_on_val_lost_on_resume", "train.py",
     'start_epoch, groups, best = ckpt["epoch"] + 1, ckpt["groups"], ckpt["best"]',
     'start_epoch, groups, best = ckpt["epoch"] + 1, ckpt["groups"], None', [PT + "test_resume_keeps_best_on_val"]),
    ("plain_step_not_summed_over_processes", "train.py",
     "gbg.weighted_backward([mean_loss] + extra, [la] + [1.0] * bcl, params, process_group=pg)",
     "gbg.weighted_backward([mean_loss] + extra, [la] + [1.0] * bcl, params, process_group=None)", DIST),
    # the contract with the user
    ("resume_ignores_the_flags", "train.py",
     "        check_resume_flags(ckpt, args, resume_path)", "        pass",
     [C + "test_resume_never_continues_another_experiment"]),
    ("resume_lets_lr_change", "train.py", '"eval_every",\n', '"eval_every", "lr",\n',
     [C + "test_resume_never_continues_another_experiment"]),
    ("file_crops_from_the_workers_rng", "data_lt.py",
     "if train and seed is not None and isinstance(ds, ImageList) and ds.transform is not None:", "if False:",
     [C + "test_image_files_train_the_same_with_0_1_and_2_workers"]),
    ("eval_ignores_the_checkpoints_data_root", "train.py",
     '        args.data_root = trained.get("data_root")', '        pass',
     [C + "test_eval_reads_the_data_root_of_the_checkpoint"]),
    ("divergence_claims_a_checkpoint", "train.py", "if epoch > 0 else", "if True else",
     [C + "test_divergence_message_is_true"]),
    ("negligible_update_warned_an_epoch_late", "train.py",
     "if negligible >= NEGLIGIBLE_EPOCHS:", "if negligible > NEGLIGIBLE_EPOCHS:",
     [C + "test_a_negligible_gbg_update_is_reported"]),
    # the reproduction script and its budget
    ("repro_python_on_path", "tests/repro.py",
     'cmd = [args.python, str(ROOT / "train.py")', 'cmd = ["python", str(ROOT / "train.py")',
     [R + "test_one_epoch_end_to_end_on_cpu_and_summarize"]),
    ("repro_pace_counts_the_grouping_epoch", "tests/repro.py",
     "(grouped_at is None or e > grouped_at)", "(grouped_at is None or e >= grouped_at)",
     [R + "test_pace_uses_the_epochs_that_measure_the_run_now"]),
    ("repro_stops_on_lower_bounds", "tests/repro.py",
     "if max(ends) > deadline and all(final[j] for j in kept):", "if max(ends) > deadline:",
     [R + "test_runs_to_stop_keeps_runs_in_priority_order_while_they_fit",
      R + "test_budget_policy_on_a_simulated_shared_device"]),
    ("repro_shared_ends_without_sharing", "tests/repro.py",
     "t += (works[i] - done) * (len(works) - k)", "t += works[i] - done",
     [R + "test_shared_ends_match_a_fluid_simulation"]),
    # the pictures of run folders
    ("plot_draws_unevaluated_epochs", "tests/plot_runs.py",
     "    pairs = [(e, v) for e, v in pairs if v is not None]\n", "",
     [PL + "test_epochs_logged_as_nan_or_twice", PL + "test_drawn_series_are_the_logged_values"]),
    ("plot_diagnostic_at_the_first_epoch", "tests/plot_runs.py",
     "return max(both) if both else None", "return min(both) if both else None",
     [PL + "test_drawn_series_are_the_logged_values"]),
    ("plot_bars_in_class_id_order", "tests/plot_runs.py",
     "key=lambda k: (-counts[k], k)", "key=lambda k: k",
     [PL + "test_diagnostic_classes_follow_the_training_counts"]),
    # ready for the GPU: no host waits on the step path, the same path on the CPU and CUDA
    ("bincount_in_the_step", "train.py",
     "counts = all_reduce_(gbg.count_labels(y, model.fc.out_features))",
     "counts = all_reduce_(torch.bincount(y, minlength=model.fc.out_features))",
     ["tests/test_host_sync.py::test_only_the_mgda_solve_reads_the_device"]),
    ("sampler_numpy_of_device_labels", "train.py",
     "labels = gbg._dataset_labels(data.train)", "labels = np.asarray(data.train.targets)",
     ["tests/test_host_sync.py::test_training_pieces_run_on_device_resident_data"]),
    ("max_pool_head", "train.py",
     "return F.adaptive_avg_pool2d(x, 1).flatten(1)", "return F.adaptive_max_pool2d(x, 1).flatten(1)",
     ["tests/test_host_sync.py::test_every_op_has_a_deterministic_cuda_kernel"]),
    ("contiguous_mgda_grads", "gbg.py",
     "p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g.detach())",
     "p.grad = g.detach().clone()", ["tests/test_cuda_paths.py::test_mgda_grads_take_the_parameters_layout"]),
    ("sync_bn_2d_only", "train.py",
     "if isinstance(child, nn.modules.batchnorm._BatchNorm):", "if isinstance(child, nn.BatchNorm2d):",
     ["tests/test_cuda_paths.py::test_sync_bn_converts_the_same_modules_on_cpu_and_cuda"]),
    ("count_bins_edge_inclusive_high", "gbg.py",  # a count of 10 would fall in [0, 10)
     'np.searchsorted(np.asarray(edges, dtype=float), counts, side="right")',
     'np.searchsorted(np.asarray(edges, dtype=float), counts, side="left")',
     ["tests/test_grouping.py::test_count_bins_groups_are_li_et_al_2020_bins"]),
    ("recalibration_weights_batches_equally", "gbg.py",
     "                seen[0] += len(x)\n                seen[1] = len(x) / seen[0]",
     "                seen[0] += 1\n                seen[1] = 1.0 / seen[0]",  # the plain average over batches
     ["tests/test_grouping.py::test_recalibration_weights_batches_by_their_size"]),
    ("recalibration_keeps_a_batch_of_one", "gbg.py",
     "            if len(chunks) > 1 and len(chunks[-1]) == 1:", "            if False:",
     ["tests/test_grouping.py::test_recalibration_never_makes_a_batch_of_one"]),
    ("to_device_non_blocking_to_the_host", "gbg.py",
     'non_blocking=t.device.type == "cpu")  # from the host only', "non_blocking=True)",
     ["tests/test_grouping.py::test_to_device_blocks_on_copies_to_the_cpu"]),
    ("group_ids_unchecked", "gbg.py",
     "    if not torch.is_tensor(class_to_group) and len(class_to_group) and \\\n",
     "    if False and \\\n",
     ["tests/test_moo.py::test_group_losses_refuses_group_ids_beyond_num_groups"]),
    # the command line reaching what it sets (issue #37's review)
    ("group_loss_flag_not_passed", "train.py",
     "gbg.group_losses(logits, y, class_to_group, G, mode=args.group_loss,",
     "gbg.group_losses(logits, y, class_to_group, G,",
     ["tests/test_step.py::test_mgda_step_matches_separate_passes[ce-all-sample]"]),
    ("resume_lets_data_seed_change", "train.py",
     '"rank", "local_rank", "distributed", "eval", "resume", "amp")',
     '"rank", "local_rank", "distributed", "eval", "resume", "amp", "data_seed")',
     [C + "test_every_flag_outside_the_list_is_refused_at_resume"]),
    ("eval_ignores_the_checkpoints_imb_factor", "train.py",
     'MODEL_OPTIONS = ("dataset", "imb_factor", "data_seed", "arch", "loss")',
     'MODEL_OPTIONS = ("dataset", "data_seed", "arch", "loss")',
     [C + "test_eval_takes_the_model_options_of_the_checkpoint"]),
    ("deterministic_keeps_matmul_tf32", "train.py",
     "    torch.backends.cuda.matmul.allow_tf32 = False\n", "",
     ["tests/test_cuda_paths.py::test_deterministic_sets_what_cuda_needs"]),
    ("submit_truncates_the_timeout", "slurm/submit.py",
     "time=max(1, math.ceil(args.timeout))", "time=max(1, int(args.timeout))",
     ["tests/test_slurm.py::test_dry_run_rounds_the_time_up_and_prints_a_train_command_that_parses"]),
    ("plot_medium_and_few_panels_swapped", "tests/plot_runs.py",
     '("test_medium", "Medium (20-100 images)"), ("test_few", "Few (< 20 images)")',
     '("test_few", "Medium (20-100 images)"), ("test_medium", "Few (< 20 images)")',
     [PL + "test_each_accuracy_panel_draws_its_own_key"]),
    ("failed_run_leaves_its_empty_output_dir", "train.py",
     "        atexit.register(remove_if_empty, out)\n", "        pass\n",
     ["tests/test_train.py::test_errors_are_one_clear_line"]),
    ("failed_download_leaves_an_empty_data_root", "data_lt.py",
     "        if not existed:  # torchvision made", "        if False:  # torchvision made",
     ["tests/test_data.py::test_a_failed_cifar_download_leaves_no_empty_data_root"]),
    ("eta_leaves_out_the_groupings_to_come", "train.py",
     "left += sum(self.grouping_s[-5:]) / len(self.grouping_s[-5:])", "left += 0.0",
     ["tests/test_prints.py::test_eta_prices_gbg_epochs_and_the_grouping_apart_from_the_warm_up"]),
    ("eta_mixes_warm_up_and_gbg_epochs", "train.py",
     "recent = self.epoch_s.get(self.kind(e), [])[-5:]", "recent = sum(self.epoch_s.values(), [])[-5:]",
     ["tests/test_prints.py::test_eta_prices_gbg_epochs_and_the_grouping_apart_from_the_warm_up"]),
    ("eval_without_resume_traceback", "train.py",
     "    if args.resume is None:  # before fill_defaults, whose check says the same\n", "    if False:\n",
     ["tests/test_train.py::test_eval_without_resume_is_one_line"]),
    ("help_hides_zero_defaults", "train.py",
     "any(action.default is v for v in (None, False, argparse.SUPPRESS))",
     "action.default in (None, False, argparse.SUPPRESS)",
     ["tests/test_prints.py::test_help_gives_every_flags_default"]),
    ("grouping_not_saved_for_a_resume", "train.py",
     "if is_main(args) and epoch > 0:  # the last checkpoint again", "if False:  # the last checkpoint again",
     [C + "test_a_stop_after_the_grouping_resumes_without_grouping_again[3]"]),
    ("resume_refuses_auto_after_a_saved_grouping", "train.py",
     '(ckpt.get("groups_info"), (ckpt.get("pending_groups") or {}).get("groups_info")))',
     '(ckpt.get("groups_info"),))',
     [C + "test_a_stop_after_the_grouping_resumes_without_grouping_again[auto]"]),
    ("workspace_shrinks", "gbg.py",
     "    if workspace is not None and (kept is None or flat.data_ptr() != kept.data_ptr()):",
     "    if workspace is not None:",
     ["tests/test_moo.py::test_workspace_keeps_its_largest_buffer"]),
    # issue #35's CE rows (tests/test_ce_rows.py)
    ("class_balanced_trains_on_the_sample_mean", "train.py",
     'if args.grouping == "none" and (args.moo == "mgda" or args.class_balanced):',
     'if args.grouping == "none" and args.moo == "mgda":',
     ["tests/test_ce_rows.py::test_class_balanced_run_gives_every_class_its_own_group"]),
    ("lr_gamma_ignored", "train.py",
     "return args.lr * args.lr_gamma ** sum(", "return args.lr * 0.1 ** sum(",
     ["tests/test_ce_rows.py::test_lr_gamma_gives_ldam_drws_schedule"]),
    ("augment_release_without_cutout", "data_lt.py",
     "    return x.masked_fill(hole[:, None], 0.0)", "    return x",
     ["tests/test_ce_rows.py::test_augment_release_device_view_equals_torchvision_ops"]),
    ("augment_release_ignored_for_ce", "train.py",
     '    if args.augment != "release":\n        return None', '    if True:\n        return None',
     ["tests/test_ce_rows.py::test_augment_release_device_view_equals_torchvision_ops"]),
    # a review of the merged train.py (issue #36's session)
    ("resume_skips_flags_older_checkpoints_lack", "train.py",
     'saved = {**implied_flags(ckpt["args"]), **ckpt["args"]}', 'saved = ckpt["args"]',
     ["tests/test_ce_rows.py::test_a_checkpoint_older_than_the_new_flags_is_compared_with_what_it_ran"]),
    ("features_accepts_a_z_the_losses_do_not_read", "gbg.py",
     "        if g_z is None:  # else", "        if False:  # else",
     ["tests/test_moo.py::test_features_gram_of_z_alone_is_diagonal_for_disjoint_groups"]),
    ("bcl_layer_reads_the_command_line_loss_only", "train.py",
     'layers += [BCL_BASE if loss == "bcl" else {}, BASE]', 'layers += [BCL_BASE if args.loss == "bcl" else {}, BASE]',
     ["tests/test_pins.py::test_bcl_group_loss_default_follows_a_loss_set_by_the_preset"]),
    # a review of tests/repro.py (issue #36's session)
    ("repro_leaves_runs_on_a_hangup", "tests/repro.py",
     "    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))\n", "",
     ["tests/test_repro_resume.py::test_a_hangup_ends_the_runs_too"]),
    ("repro_mixes_settings_across_seeds", "tests/repro.py",
     'others = [d for d in sorted(out.glob(f"{row}_s*"))', 'others = [d for d in sorted(out.glob(f"{row}_s{args.seeds[0]}"))',
     ["tests/test_repro_resume.py::test_a_seed_made_with_other_settings_than_the_rows_other_seeds_is_refused"]),
    ("repro_include_takes_a_seed_twice", "tests/repro.py",
     '        if (l["row"], l["seed"]) in seen:\n            fail(', '        if False:\n            fail(',
     ["tests/test_repro_resume.py::test_include_refuses_a_second_run_of_a_seed_and_other_settings"]),
    ("jpeg_copy_at_444", "tests/make_cifar_jpeg.py",
     "QUALITY, SUBSAMPLING = 75, 2", "QUALITY, SUBSAMPLING = 75, 0",
     ["tests/test_make_cifar_jpeg.py::test_files_are_quality_75_with_420_sampling"]),
]


def copy_repo(dst):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run_tests(repo, ids, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *ids]
    try:
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    return r.returncode, (r.stdout + r.stderr)[-2000:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="only these bugs (default: all)")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    ap.add_argument("--verbose", action="store_true", help="show pytest's output for bugs not caught")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="bugs checked in parallel, each in its own copy")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unchanged code")
    a = ap.parse_args()
    names = [b[0] for b in BUGS]
    assert len(set(names)) == len(names), "duplicate bug names"
    if a.list:
        for name, file, *_ in BUGS:
            print(f"{name:44} {file}")
        return 0
    unknown = set(a.names) - set(names)
    if unknown:
        sys.exit(f"plant_bugs.py: error: unknown bug(s) {sorted(unknown)}; see --list")
    bugs = [b for b in BUGS if not a.names or b[0] in a.names]

    with tempfile.TemporaryDirectory(prefix="plant_bugs_") as tmp:
        repos = [Path(tmp) / f"w{i}" for i in range(max(a.jobs, 1))]
        for repo in repos:
            repo.mkdir()
            copy_repo(repo)
        if not a.no_baseline:
            ids = list(dict.fromkeys(i for b in bugs for i in b[4]))
            t0 = time.time()
            rc, out = run_tests(repos[0], ids, a.timeout * 2)
            if rc != 0:
                print(out)
                sys.exit(f"plant_bugs.py: error: the tests fail on the unchanged code (exit {rc}); fix them first")
            print(f"baseline: {len(ids)} test ids pass on the unchanged code ({time.time() - t0:.0f} s)", flush=True)
        free = queue.Queue()
        for repo in repos:
            free.put(repo)

        def plant(bug):
            name, file, old, new, tests = bug
            repo = free.get()
            try:
                path = repo / file
                text = path.read_text()
                n = text.count(old)
                if n != 1:
                    return ("SNIPPET NOT FOUND" if n == 0 else f"SNIPPET FOUND {n} TIMES"), "", 0.0
                t0 = time.time()
                path.write_text(text.replace(old, new))
                try:
                    rc, out = run_tests(repo, tests, a.timeout)
                finally:
                    path.write_text(text)
                return {1: "caught", 0: "SURVIVED"}.get(rc, f"ERROR (pytest exit {rc})"), out, time.time() - t0
            finally:
                free.put(repo)

        failed = 0
        with concurrent.futures.ThreadPoolExecutor(max(a.jobs, 1)) as pool:
            for (name, file, *_), (status, out, took) in zip(bugs, pool.map(plant, bugs)):
                failed += status != "caught"
                print(f"{status:22} {name:44} {file:20} {took:5.0f} s", flush=True)
                if a.verbose and status != "caught" and out:
                    print(out)
    print(f"{len(bugs) - failed} of {len(bugs)} planted bugs caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
