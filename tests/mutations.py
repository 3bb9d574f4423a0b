"""Mutation check: plausible bugs, each applied to a temporary copy of the repository, with the tests
meant to catch it; reports which mutations survive (their tests all pass).

  python -m tests.mutations                        # every mutation (about half an hour on 2 cores)
  python -m tests.mutations --list                 # names and descriptions
  python -m tests.mutations brightness-shift-zero decoder-shortcut-after-activation
  python -m tests.mutations --baseline             # first: every listed test passes unmutated

Not collected by pytest (its name does not start with test_) and not part of the test run: some
mutations' tests train a tiny model. The copy leaves out .git, .venv, runs/ and data/; the tests run
there with this interpreter (`python -m pytest -n 0 -x`), all mutations sharing one JAX compilation
cache. A mutation whose text is no longer found once in its file is reported as stale (the code
moved on: update the mutation). Exit status 1 if any mutation survived or was stale.
"""

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    edits: tuple[tuple[str, str, str], ...]  # (file, text found exactly once, its replacement)
    tests: tuple[str, ...]  # pytest node ids


MUTATIONS = (
    Mutation(
        "evaluate-fast-parameters",
        "evaluation restores the fast (training) weights instead of Lookahead's slow ones",
        (
            (
                "ossnet_jax/evaluation.py",
                '{"params": state.params.slow, "batch_stats": state.batch_stats}',
                '{"params": state.params.fast, "batch_stats": state.batch_stats}',
            ),
        ),
        (
            "tests/test_unet.py::test_evaluate_restores_a_unet_checkpoint_with_the_same_metrics",
            "tests/test_training.py::test_checkpoints_hold_no_pickle_and_restore_without_unpickling",
        ),
    ),
    Mutation(
        "compare-memory-without-donation",
        "the compiled-memory analysis of compare.py no longer donates the train state",
        (
            (
                "ossnet_jax/compare.py",
                "functools.partial(family.train_step, model=model, tx=tx, config=config), "
                "donate_argnums=0",
                "functools.partial(family.train_step, model=model, tx=tx, config=config)",
            ),
        ),
        (
            "tests/test_compare.py::test_train_step_memory_counts_arguments_temporaries_and_donation",
        ),
    ),
    Mutation(
        "decoder-in-float32",
        "with train.dtype / eval.dtype bfloat16 the decoder silently computes in float32",
        (
            (
                "ossnet_jax/families/oss_net/model.py",
                "            self.dropout,\n            self.dtype,\n            self.remat in",
                "            self.dropout,\n            jnp.float32,\n            self.remat in",
            ),
        ),
        (
            "tests/test_mixed_precision.py::"
            "test_every_layer_of_encoder_patch_encoder_and_decoder_computes_in_bfloat16",
        ),
    ),
    Mutation(
        "brightness-shift-zero",
        "the brightness augmentation's shift is multiplied by zero",
        (
            (
                "ossnet_jax/data/augment.py",
                "image = image + jnp.where(apply, shift, 0.0)",
                "image = image + jnp.where(apply, shift * 0, 0.0)",
            ),
        ),
        ("tests/test_sampling.py::test_augment_brightness_shift_is_one_uniform_value_per_volume",),
    ),
    Mutation(
        "slices-png-without-overlays",
        "the slice pictures no longer draw the prediction and label overlays",
        (
            (
                "ossnet_jax/outputs.py",
                "_draw_mask(ax, masks[key][cut], extent, colour)",
                "pass",
            ),
        ),
        ("tests/test_outputs.py::test_slices_png_draws_prediction_and_label_overlays",),
    ),
    Mutation(
        "no-writable-workdir-check",
        "training no longer checks that the workdir is writable before it starts",
        (("ossnet_jax/training.py", "    files.ensure_writable_dir(workdir)\n", ""),),
        ("tests/test_reliability.py::test_a_read_only_workdir_fails_before_training_and_is_named",),
    ),
    Mutation(
        "resume-restarts-from-zero",
        "a resumed run silently starts again from step 0 with fresh parameters (and skips saving "
        "the steps that exist, so orbax does not object)",
        (
            (
                "ossnet_jax/training.py",
                "_train(config, workdir, ckpt, ckpt.latest_step() or 0,",
                "_train(config, workdir, ckpt, 0,",
            ),
            (
                "ossnet_jax/training.py",
                "    if ckpt.latest_step() is not None:  # step 0 too",
                "    if False:  # step 0 too",
            ),
            (
                "ossnet_jax/checkpointing.py",
                "        self.manager.save(step, args=ocp.args.StandardSave(state)",
                "        if step in self.manager.all_steps():\n            return\n"
                "        self.manager.save(step, args=ocp.args.StandardSave(state)",
            ),
        ),
        ("tests/test_training.py::test_resume_reaches_the_same_parameters",),
    ),
    Mutation(
        "decoder-shortcut-after-activation",
        "the decoder block adds its shortcut after the last activation instead of before it",
        (
            (
                "ossnet_jax/models/decoder.py",
                'return act(self.kernels, name="act2")(h + shortcut)',
                'return act(self.kernels, name="act2")(h) + shortcut',
            ),
        ),
        ("tests/test_decoder.py::test_decoder_equals_a_float64_formula_of_its_blocks",),
    ),
    Mutation(
        "lookahead-alpha",
        "Lookahead moves the slow weights half way (0.5) instead of train.lookahead_alpha (0.8)",
        (
            (
                "ossnet_jax/train_state.py",
                "slow_step_size=t.lookahead_alpha",
                "slow_step_size=0.5",
            ),
        ),
        ("tests/test_recipe.py::test_updates_are_radam_in_lookahead_with_the_learning_rate_steps",),
    ),
    Mutation(
        "pau-rate-not-raised",
        "the PAU coefficients train at the base learning rate",
        (
            (
                "ossnet_jax/train_state.py",
                "schedule(step) * t.pau_lr_multiplier",
                "schedule(step)",
            ),
        ),
        ("tests/test_recipe.py::test_updates_are_radam_in_lookahead_with_the_learning_rate_steps",),
    ),
    Mutation(
        "segmentation-loss-unweighted",
        "the gradient takes the segmentation head's loss at weight 1, not train.seg_loss_weight",
        (
            (
                "ossnet_jax/families/oss_net/step.py",
                "return point_loss + t.seg_loss_weight * seg_loss, (",
                "return point_loss + seg_loss, (",
            ),
        ),
        ("tests/test_recipe.py::test_segmentation_head_adds_its_weighted_loss_to_the_point_loss",),
    ),
    Mutation(
        "fourier-without-2pi",
        "the Fourier features take sin and cos of u B instead of 2 pi u B",
        (
            (
                "ossnet_jax/models/decoder.py",
                "angle = 2.0 * jnp.pi * unit @ fourier",
                "angle = unit @ fourier",
            ),
        ),
        ("tests/test_recipe.py::test_fourier_features_are_sin_and_cos_of_the_projected_location",),
    ),
    Mutation(
        "min-components-ignored",
        "eval.min_component_voxels is ignored",
        (
            (
                "ossnet_jax/evaluation.py",
                'if ev.get("min_component_voxels", 0):',
                "if False:",
            ),
        ),
        (
            "tests/test_evaluation.py::"
            "test_evaluate_applies_the_eval_config_and_rewrites_metrics_after_every_case",
        ),
    ),
    Mutation(
        "surface-tolerance-ignored",
        "the surface Dice uses 1 mm whatever eval.surface_tolerance_mm says",
        (("ossnet_jax/evaluation.py", 'ev.get("surface_tolerance_mm", 1.0),', "1.0,"),),
        (
            "tests/test_evaluation.py::"
            "test_evaluate_applies_the_eval_config_and_rewrites_metrics_after_every_case",
        ),
    ),
    Mutation(
        "metrics-json-only-at-the-end",
        "metrics.json is written once at the end instead of after every case",
        (
            (
                "ossnet_jax/evaluation.py",
                'files.write_json(out_dir / "metrics.json", partial)',
                "pass",
            ),
        ),
        (
            "tests/test_evaluation.py::"
            "test_evaluate_applies_the_eval_config_and_rewrites_metrics_after_every_case",
        ),
    ),
    Mutation(
        "no-meshes",
        "evaluation writes no mesh files",
        (("ossnet_jax/reporting.py", "    if meshes:\n", "    if False:\n"),),
        ("tests/test_evaluation.py::test_evaluate_writes_meshes_pictures_and_the_dice_chart",),
    ),
    Mutation(
        "no-mesh-png",
        "evaluation draws no picture of the predicted surface",
        (("ossnet_jax/reporting.py", "        if mesh is not None:\n", "        if False:\n"),),
        ("tests/test_evaluation.py::test_evaluate_writes_meshes_pictures_and_the_dice_chart",),
    ),
    Mutation(
        "no-dice-png",
        "evaluation draws no Dice chart",
        (
            (
                "ossnet_jax/evaluation.py",
                'outputs.dice_summary_png(out_dir / "dice.png", rows)',
                "pass",
            ),
        ),
        ("tests/test_evaluation.py::test_evaluate_writes_meshes_pictures_and_the_dice_chart",),
    ),
    Mutation(
        "free-space-ignores-present-checkpoints",
        "the free-space check asks room for 5 checkpoints even when some are already written",
        (
            (
                "ossnet_jax/checkpointing.py",
                "return max(1, self.keep + 2 - len(self.manager.all_steps()))",
                "return self.keep + 2",
            ),
        ),
        (
            "tests/test_training.py::"
            "test_free_space_check_counts_the_checkpoints_present_and_stops_before_writing",
        ),
    ),
    Mutation(
        "free-space-counts-parameters-only",
        "training sizes a checkpoint by its parameters, leaving out optimizer state and statistics",
        (
            (
                "ossnet_jax/training.py",
                "sum(leaf.nbytes for leaf in jax.tree.leaves(state)),",
                "sum(leaf.nbytes for leaf in jax.tree.leaves(state.params)),",
            ),
        ),
        (
            "tests/test_training.py::"
            "test_free_space_check_counts_the_checkpoints_present_and_stops_before_writing",
        ),
    ),
    Mutation(
        "pickle-in-checkpoint",
        "the checkpoints folder also keeps each step's metrics as a pickle",
        (
            (
                "ossnet_jax/checkpointing.py",
                "        self.manager.wait_until_finished()\n\n    def latest_step",
                "        self.manager.wait_until_finished()\n        import pickle\n\n"
                '        (self.directory / f"metrics-{step}").write_bytes(pickle.dumps(metrics))'
                "\n\n    def latest_step",
            ),
        ),
        ("tests/test_training.py::test_checkpoints_hold_no_pickle_and_restore_without_unpickling",),
    ),
    Mutation(
        "cache-race",
        "a cache folder renamed onto one another run finished first is an error",
        (
            (
                "ossnet_jax/data/dataset.py",
                "        try:\n            os.replace(tmp, folder)\n        except OSError:\n"
                '            if not (folder / "meta.json").exists():',
                "        os.replace(tmp, folder)\n        if False:\n            if True:",
            ),
        ),
        ("tests/test_dataset.py::test_two_processes_build_one_cache_at_once",),
    ),
    Mutation(
        "cache-dir-ignored",
        "data.cache_dir is ignored: the cache goes into data.root",
        (("ossnet_jax/data/dataset.py", 'config.data.get("cache_dir") or ', ""),),
        ("tests/test_dataset.py::test_data_cache_dir_holds_the_cache_instead_of_the_data_folder",),
    ),
    Mutation(
        "evaluate-py-ignores-overwrite",
        "evaluate.py drops --overwrite",
        (
            (
                "evaluate.py",
                "evaluation.evaluate(config, FLAGS.workdir, cases, out_dir, FLAGS.overwrite)",
                "evaluation.evaluate(config, FLAGS.workdir, cases, out_dir, False)",
            ),
        ),
        ("tests/test_training.py::test_evaluate_py_predicts_another_dataset_again_with_overwrite",),
    ),
    Mutation(
        "evaluate-py-ignores-data-root",
        "evaluate.py evaluates the validation split whatever --data.root says",
        (("evaluate.py", 'root = FLAGS["data.root"].value', 'root = ""'),),
        ("tests/test_training.py::test_evaluate_py_predicts_another_dataset_again_with_overwrite",),
    ),
    Mutation(
        "compare-writes-no-table",
        "python -m ossnet_jax.compare writes no Markdown table",
        (
            (
                "ossnet_jax/compare.py",
                '    files.write_bytes(out.with_suffix(".md"), markdown(rows, settings).encode())\n',
                "",
            ),
        ),
        ("tests/test_unet.py::test_compare_runs_as_a_program_and_tabulates_a_finished_run",),
    ),
    *(
        Mutation(
            f"resume-ignores-{key.replace('_', '-')}",
            f"resuming accepts a changed data.{key}",
            (("ossnet_jax/training.py", f'    "{key}",\n', ""),),
            ("tests/test_reliability.py::test_resuming_refuses_changed_labels_and_downscale",),
        )
        for key in ("label_mode", "labels", "downscale", "region_labels")
    ),
)


def _copy(destination: pathlib.Path) -> None:
    """The working tree without .git, .venv, caches and the top-level runs/ and data/ folders."""
    everywhere = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".ossnet_cache", "*.egg-info"
    )

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = {"runs", "data"} if pathlib.Path(folder) == REPO else set()
        return set(everywhere(folder, names)) | (top & set(names))

    shutil.copytree(REPO, destination, symlinks=True, ignore=ignore)


def _pytest(copy: pathlib.Path, tests: tuple[str, ...], env: dict) -> tuple[int, list[str]]:
    """Runs `tests` in the copy, stopping at the first failure: (exit status, the failed test and the
    last output line)."""
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-rfE", *tests]
    done = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return done.returncode, failed + lines[-1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="first run every test unmutated")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.description}\n    {' '.join(m.tests)}")
        return 0
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutations {unknown}; see --list")
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    report, failed = [], False
    with tempfile.TemporaryDirectory(prefix="ossnet_mutations_") as tmp:
        copy = pathlib.Path(tmp) / "repo"
        _copy(copy)
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(tmp) / "jax_cache"))
        env.pop("PYTEST_ADDOPTS", None)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, tail = _pytest(copy, tests, env)
            print(f"baseline (unmutated): exit {code} {' '.join(tail)}", flush=True)
            if code != 0:
                print("the tests fail without a mutation: fix that first")
                return 1
        for m in chosen:
            originals = {}
            stale = []
            for name, old, new in m.edits:
                path = copy / name
                text = path.read_text()  # with this mutation's earlier edits of the file
                originals.setdefault(name, (path, text))
                if text.count(old) != 1:
                    stale.append(f"{name}: found {text.count(old)} times")
                    continue
                path.write_text(text.replace(old, new))
            start = time.perf_counter()
            if stale:
                verdict, tail = "STALE", stale
            else:
                code, tail = _pytest(copy, m.tests, env)
                verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"caught (exit {code})")
            for path, text in originals.values():
                path.write_text(text)
            failed |= verdict in ("SURVIVED", "STALE")
            line = f"{verdict:9} {m.name} ({time.perf_counter() - start:.0f} s): {' '.join(tail)}"
            report.append(line)
            print(line, flush=True)
    survived = sum(line.startswith(("SURVIVED", "STALE")) for line in report)
    print(f"\n{len(report) - survived} of {len(report)} mutations caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
