"""Print every trial of a study: state, configuration, the simulator's prediction and what was measured."""
import sys

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
storage, name = sys.argv[1], sys.argv[2]
study = optuna.load_study(study_name=name, storage=storage)
for t in study.get_trials(deepcopy=False):
    a = t.user_attrs
    s = a.get("summary") or {}
    p = a.get("predicted") or {}
    print(t.number, t.state.name, t.values, a.get("prescreened", "")[:90])
    print("   ", {k: v for k, v in (a.get("config") or t.params).items()
                  if k not in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")})
    print("    predicted goodput {} tok/s {} ttft99 {} tpot99 {}".format(p.get("goodput"), p.get("output_throughput"),
                                                                    p.get("ttft_p99"), p.get("tpot_p99")))
    if s:
        print("    measured  goodput {} tok/s {:.0f} ttft99 {:.0f} tpot99 {:.1f} ready {}".format(
            s.get("goodput"), s.get("output_throughput", 0), s.get("p99_ttft_ms") or 0, s.get("p99_tpot_ms") or 0,
            a.get("ready_s")))
print("study attrs finals:", study.user_attrs.get("finals"))
