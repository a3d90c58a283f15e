"""Text distillation: does the student keep >= 97% of its BERT teacher at >= 7.5x fewer
parameters and >= 9x lower batch-1 CPU latency, and does KD beat no KD?

On the text demo's data (configs/text-demo.yaml: which of 8 libraries a docstring's first
paragraph comes from), through the pipeline's own stages on a local Ray:
  - teacher:   a 6-layer, 256-wide BERT (configs/text/bert-L6-H256-teacher; the demo's
               BERT-Mini has 4 layers) trained from scratch, ZeRO-3 across 2 gloo workers;
  - student:   a 2-layer, 64-wide BERT distilled from it (KD on logits, the preset's T and
               alpha), exported to ONNX and int8 (dynamic quantization);
  - no KD:     the same student, same seed, init, batches and steps, on the labels alone
               (student.kd_control: alpha=1).
With --set data.unlabelled_source=docstrings the KD student also distils on 5,522 unlabelled
docstring paragraphs (each epoch: those, then the labelled texts), and the no-KD control trains
as many steps on the labelled texts alone.
The student is trained with --seeds N student seeds (student.seed; the splits and the teacher
stay fixed). Met when: retention (the seed-0 int8 student's test accuracy / the teacher's) >=
0.97; params ratio >= 7.5; the teacher's ONNX batch-1 latency >= 9x the fp32 student's, one
thread, the two alternating row by row (text/distill._latency_in_turns); and the mean over the
seeds of (KD - no-KD test accuracy) > 0. Every seed's pair is printed.

    python bench/text_compression.py [--quick] [--seeds N] [--set KEY=VALUE ...]

--quick: 2 seeds and the preset's epochs (8 and 6); full: 3 seeds, teacher 12 and student 14 epochs.
"""

from __future__ import annotations

import statistics
import tempfile

from harness import REPO, Bench


def main() -> None:
    bench = Bench("text_compression", __doc__, repeats=None,
                  target="text student keeps >= 0.97 of the BERT teacher's accuracy with >= 7.5x fewer params and "
                         ">= 9x lower batch-1 ONNX latency; KD beats no-KD (mean over seeds)")
    bench.parser.add_argument("--seeds", type=int, default=None, help="student seeds (default 3; 2 with --quick)")
    bench.parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override a key of configs/text-demo.yaml")
    args = bench.parse()
    seeds = args.seeds or (2 if args.quick else 3)

    import ray

    from raydistill import pipeline
    from raydistill.config import load_config

    sets = ["teacher.arch=hf:" + str(REPO / "configs" / "text" / "bert-L6-H256-teacher"), "teacher.lr=5e-4",
            *([] if args.quick else ["teacher.epochs=12", "student.epochs=14"])]
    cfg = load_config(REPO / "configs" / "text-demo.yaml", [*sets, "student.kd_control=true", *args.set])
    ray.init(address="local", include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        teacher = pipeline.run_stages(cfg, storage, "bench", ("teacher",))["teacher"]
        for seed in range(seeds):
            student = pipeline.run_stages(cfg.with_values({"student.seed": seed}), storage, "bench", ("student",))["student"]
            rows.append(student)
            print(f"seed {seed}: KD {student['trained_test_accuracy']:.4f}  no KD {student['test_accuracy_without_kd']:.4f}  "
                  f"int8 {student['int8_accuracy']:.4f}", flush=True)
    ray.shutdown()

    first = rows[0]
    gains = [r["trained_test_accuracy"] - r["test_accuracy_without_kd"] for r in rows]
    latency = first["latency_ms_p50_exported"]
    retention = first["int8_accuracy"] / teacher["accuracy"]
    figures = {
        "teacher_accuracy": teacher["accuracy"], "teacher_params": teacher["params_total"],
        "student_accuracy": first["accuracy"], "student_int8_accuracy": first["int8_accuracy"],
        "student_params": first["params_total"], "retention_int8": retention,
        "retention_fp32": first["retention"], "params_ratio": first["params_ratio"],
        "latency_ms_teacher_onnx": latency["teacher_onnx"], "latency_ms_student_onnx": latency["student_onnx"],
        "latency_ms_student_int8": latency.get("student_int8"), "latency_ratio_onnx": first["latency_ratio_onnx"],
        "kd_gain_per_seed": gains, "kd_gain_mean": statistics.mean(gains),
        "kd_gain_std": statistics.pstdev(gains), "seeds": seeds,
        "teacher_train_s": teacher["train_time_s"], "majority_accuracy": teacher["majority_accuracy"],
    }
    checks = {"retention": retention >= 0.97, "params": first["params_ratio"] >= 7.5,
              "latency": first["latency_ratio_onnx"] >= 9.0, "kd": statistics.mean(gains) > 0}
    print(f"\n{'':24}{'teacher':>12}{'student':>12}\n{'test accuracy':24}{teacher['accuracy']:12.4f}"
          f"{first['int8_accuracy']:12.4f} (int8)\n{'params':24}{teacher['params_total']:12,}{first['params_total']:12,}\n"
          f"{'ONNX batch-1 p50 ms':24}{latency['teacher_onnx']:12.3f}{latency['student_onnx']:12.3f}\n"
          f"KD gain per seed {['%+.4f' % g for g in gains]}  checks {checks}")
    bench.finish(met=all(checks.values()), figures={**figures, "checks": checks},
                 compare={"teacher ONNX": latency["teacher_onnx"], "student ONNX": latency["student_onnx"],
                          "student int8": latency.get("student_int8")}, unit="ms (batch 1, one thread)")


if __name__ == "__main__":
    main()
