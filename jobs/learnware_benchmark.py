"""LW-C10: the learnware market's CIFAR-10 image scenario rebuilt, S&P beside its reference rows.

python jobs/learnware_benchmark.py [--preset lw-c10] [--epochs N] [--users U] [--out DIR]
Trains the market if missing, slices every pair on Ray, evaluates every user (see
snp_ray/evaluation/learnware.py), runs the learnware package's reusers in their own environment
when --learnware-python is given, writes learnware.json, report.md and learnware-budgets.png.
"""
import argparse
import sys

import _jobenv  # noqa: F401  - exits with a hint when this python is not the project's venv


def main(argv=None) -> int:
    from snp_ray.engine.command import run_command
    from snp_ray.evaluation.learnware import MethodsConfig, UsersConfig
    from snp_ray.engine.learnware import LearnwareJobConfig, run
    from snp_ray.runtime import ray_env_defaults

    ray_env_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lw-c10", help="lw-c10 or lw-c10-smoke")
    p.add_argument("--store", default="")
    p.add_argument("--epochs", type=int, default=0, help="market epochs (0: the preset's 35)")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--budgets", default="100,200,500,1000,2000,4000")
    p.add_argument("--repeats", default="10,10,10,3,3,3")
    p.add_argument("--max-repeats", type=int, default=0, help="cap repeats per budget (0: none)")
    p.add_argument("--plans", default="best,top-2", help="no-label plans (all packs every holder)")
    p.add_argument("--user-epochs", type=int, default=35, help="user model epochs (0: no user model)")
    p.add_argument("--user-model-budgets", default="", help="budgets with a user model (default all)")
    p.add_argument("--reuse-budgets", default="100,200,500,1000",
                   help="budgets exported for the learnware package's EnsemblePruning")
    p.add_argument("--learnware-python", default="", help="python of `make learnware-env`")
    p.add_argument("--seed", type=int, default=0, help="user seed (>= 1000: clean evidence only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/learnware")
    p.add_argument("--redraw", action="store_true", help="only rewrite report.md and the figure in "
                   "--out from learnware.json and learnware_package.json")
    p.add_argument("--reuse", action="store_true", help="only run the learnware package's reusers "
                   "(--learnware-python) on --out's exports into learnware_package.json, then redraw")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.redraw or a.reuse:
        from snp_ray.engine.learnware import redraw, reuse

        return run_command(lambda: reuse(a.learnware_python, a.out) if a.reuse else redraw(a.out),
                           a.json)[0]
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cfg = LearnwareJobConfig(
        preset=a.preset, store=a.store, epochs=a.epochs, workers=a.workers,
        learnware_python=a.learnware_python,
        users=UsersConfig(users=a.users, budgets=ints(a.budgets), repeats=ints(a.repeats), seed=a.seed),
        methods=MethodsConfig(plans=[x for x in a.plans.split(",") if x], user_epochs=a.user_epochs,
                              user_model_budgets=ints(a.user_model_budgets),
                              reuse_budgets=ints(a.reuse_budgets), max_repeats=a.max_repeats))
    rc, _ = run_command(lambda: {k: v for k, v in run(cfg, a.out).items() if k != "rows"}, a.json)
    return rc


if __name__ == "__main__":
    sys.exit(main())
