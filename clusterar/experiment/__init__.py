"""`clusterar experiment SPEC`: baseline, IAR and CTF trained and evaluated under identical conditions.

Every run starts from the same tokenizer and token files with the same seed and budget, or, with
`seeds = [...]`, once per seed. Each run is evaluated on snapshots (FID, IS, precision, recall and the
class accuracy of the samples, plus val token and cluster accuracy), sampling-time sweeps run on the final
models, and the report holds the analogues of CTF's Tables 1-3 / Fig. 2 and IAR's Fig. 4c, the tokenizer's
ceiling, the mean and spread over seeds with verdicts by a stated rule (clusterar.compare), the papers'
speed-up claims checked per seed, and whether the baseline has converged.

- `spec.py`    the spec file: schema, parsing, one check per table (`check_spec`), and the configs it implies
- `runner.py`  running it: each stage once, cached and resumable (`run_experiment`)
- `plan.py`    an experiment sized for a user's image folder and a time budget (`plan_experiment`)
- `report.py`  report.md and its pictures, rendered from report.json (`render_report`); the numbers in it
               (comparison table, verdicts, claims, convergence) are clusterar.compare's

See `clusterar/specs/*.toml` for complete examples.
"""

from .plan import plan_experiment
from .report import render_report
from .runner import InvocationClock, run_experiment
from .spec import SPECS_DIR, ExperimentSpec, check_spec, load_spec, parse_spec, tomllib

__all__ = [
    "SPECS_DIR",
    "ExperimentSpec",
    "InvocationClock",
    "check_spec",
    "load_spec",
    "parse_spec",
    "plan_experiment",
    "render_report",
    "run_experiment",
    "tomllib",
]
