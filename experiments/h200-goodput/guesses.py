"""What the calibrated simulator would queue after the defaults in the H200 study (no GPU): the
prescreen's best guesses for run.sh's study (Azure conversation slice ×12, SLO 1 s / 50 ms, vLLM 0.26.0,
8B shape on dummy weights, H200), from the calibration JSON beside this file, with their predictions and
the defaults'. Compare with what the H200 measured for the same configurations (README, rounds 1-3).

    python experiments/h200-goodput/guesses.py [SEED]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tuner.hardware.gpus import get_gpu  # noqa: E402
from tuner.loadgen.slo import parse_slo  # noqa: E402
from tuner.models.shapes import PRESETS  # noqa: E402
from tuner.space.constraints import Context  # noqa: E402
from tuner.space.fit import fit_to_model, fit_to_weights  # noqa: E402
from tuner.space.knobs import load_space  # noqa: E402
from tuner.study.prescreen import Prescreen  # noqa: E402
from tuner.study.tune import fit_parallelism  # noqa: E402
from tuner.workload.transform import load_workload  # noqa: E402

HERE = Path(__file__).resolve().parent
KEY = "h200-vllm-0.26.0-llama-3.1-8b"


def main(argv: list[str]) -> int:
    seed = int(argv[0]) if argv else 18  # run.sh's --seed
    cache = Path(tempfile.mkdtemp())
    os.environ["XDG_CACHE_HOME"] = str(cache)  # only this calibration in the cache, as run.sh leaves it
    (cache / "servetune" / "calibration").mkdir(parents=True)
    shutil.copy(HERE / f"calibration-{KEY}.json", cache / "servetune" / "calibration" / f"{KEY}.json")
    space = load_space("vllm")
    fit_parallelism(space, 1, PRESETS["llama-3.1-8b"])  # as `tune --gpus 1` does
    fit_to_model(space, "llama-3.1-8b")
    fit_to_weights(space, True)
    for knob, value in (("attention_backend", "FLASHINFER"),):  # not in the GPU bundle (run.sh's note)
        space.unavailable[(knob, value)] = "python3 cannot import flashinfer"
    requests = load_workload(ROOT / "workloads/azure_conv_rows0-399.jsonl", time_scale=12.0)
    prescreen = Prescreen(gpu="h200", shape="llama-3.1-8b", engine_versions={"vllm": "0.26.0"}, requests=requests,
                          max_model_len=6144, slo=parse_slo("ttft_p99=1s,tpot_p99=50ms"), say=lambda line: None)
    context = Context(gpus=1, gpu=get_gpu("h200"), model=PRESETS["llama-3.1-8b"], max_model_len=6144)
    study = optuna.create_study(directions=["maximize"])
    count = int(os.environ.get("COUNT", "2"))
    for params, why in prescreen.best_guesses(study, {"vllm": space}, context, count=count, seed=seed):
        changed = {k: v for k, v in params.items() if space.defaults().get(k) != v}
        print(f"{why}\n  {changed}")
    shutil.rmtree(cache)
    return 0


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raise SystemExit(main(sys.argv[1:]))
