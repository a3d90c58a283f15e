"""Question answering distillation: does the student keep >= 95% of its BERT teacher's F1
(exact match and F1 computed as the SQuAD script does), and at what size and latency?

On the QA demo's data (configs/qa-demo.yaml: questions on the parameters numpy, scipy and
scikit-learn document, answered from the docstring's Parameters section), through the
pipeline's own stages on a local Ray:
  - teacher:   the preset's BERT-Mini (4 layers, 256 wide) trained from scratch, ZeRO-3
               across 2 gloo workers;
  - student:   the preset's 2-layer, 128-wide BERT distilled on start and end logits,
               exported to ONNX and int8 (dynamic quantization).
Met when the int8 student's test F1 / the teacher's >= 0.95. Also recorded: exact match, the
params ratio, and both models' ONNX batch-1 latency, one thread, alternating window by
window (text/distill._latency_in_turns).

    python bench/qa_compression.py [--quick] [--set KEY=VALUE ...]

--quick: teacher and student 3 epochs; full: the preset's.
"""

from __future__ import annotations

import tempfile

from harness import REPO, Bench


def main() -> None:
    bench = Bench("qa_compression", __doc__, repeats=None,
                  target="QA student (int8) keeps >= 0.95 of the BERT teacher's SQuAD F1")
    bench.parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="override a key of configs/qa-demo.yaml")
    args = bench.parse()

    import ray

    from raydistill import pipeline
    from raydistill.config import load_config

    quick = ["teacher.epochs=3", "student.epochs=3"] if args.quick else []
    cfg = load_config(REPO / "configs" / "qa-demo.yaml", [*quick, *args.set])
    ray.init(address="local", include_dashboard=False)
    with tempfile.TemporaryDirectory() as storage:
        done = pipeline.run_stages(cfg, storage, "bench", ("teacher", "student"))
    ray.shutdown()
    teacher, student = done["teacher"], done["student"]
    latency = student["latency_ms_p50_exported"]
    retention = student["int8_f1"] / teacher["test_f1"]
    figures = {
        "teacher_f1": teacher["test_f1"], "teacher_exact_match": teacher["test_exact_match"],
        "student_f1": student["f1"], "student_exact_match": student["exact_match"],
        "student_int8_f1": student["int8_f1"], "student_int8_exact_match": student["int8_exact_match"],
        "retention_int8_f1": retention, "retention_fp32_f1": student["retention"],
        "teacher_params": teacher["params_total"], "student_params": student["params_total"],
        "params_ratio": student["params_ratio"], "latency_ms_teacher_onnx": latency["teacher_onnx"],
        "latency_ms_student_onnx": latency["student_onnx"], "latency_ms_student_int8": latency.get("student_int8"),
        "latency_ratio_onnx": student["latency_ratio_onnx"], "teacher_train_s": teacher["train_time_s"],
        "student_train_s": student["train_time_s"],
    }
    checks = {"retention_f1": retention >= 0.95}
    print(f"\n{'':24}{'teacher':>12}{'student':>12}\n{'test F1':24}{teacher['test_f1']:12.4f}{student['int8_f1']:12.4f} (int8)"
          f"\n{'test exact match':24}{teacher['test_exact_match']:12.4f}{student['int8_exact_match']:12.4f} (int8)"
          f"\n{'params':24}{teacher['params_total']:12,}{student['params_total']:12,}"
          f"\n{'ONNX batch-1 p50 ms':24}{latency['teacher_onnx']:12.3f}{latency['student_onnx']:12.3f}\nchecks {checks}")
    bench.finish(met=all(checks.values()), figures={**figures, "checks": checks},
                 compare={"teacher ONNX": latency["teacher_onnx"], "student ONNX": latency["student_onnx"],
                          "student int8": latency.get("student_int8")}, unit="ms (batch 1, one thread)")


if __name__ == "__main__":
    main()
