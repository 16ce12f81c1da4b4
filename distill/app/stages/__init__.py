"""Every stage as a Python function: a typed, validated config in, a :class:`StageResult` out.

    from distill.app.stages import ProgressiveConfig, run_progressive
    result = run_progressive(ProgressiveConfig(teacher="mnist", start_steps=64, target_steps=4), "runs/pd")
    result.outputs["model"], result.record
"""

from distill.app.stages.base import StageConfig, StageResult
from distill.app.stages.bench import (
    BenchConfig,
    QualityConfig,
    ReportConfig,
    SpeedConfig,
    run_bench,
    run_bench_quality,
    run_bench_report,
    run_bench_speed,
)
from distill.app.stages.export import ExportConfig, TensorRTConfig, run_export, run_tensorrt
from distill.app.stages.generate import EvalConfig, SampleConfig, run_eval, run_sample
from distill.app.stages.train import (
    ConsistencyConfig,
    DMDConfig,
    ProgressiveConfig,
    TeacherConfig,
    run_consistency,
    run_dmd,
    run_progressive,
    run_teacher,
)

__all__ = ["StageConfig", "StageResult", "TeacherConfig", "run_teacher", "ProgressiveConfig", "run_progressive",
           "ConsistencyConfig", "run_consistency",
           "DMDConfig", "run_dmd", "ExportConfig", "run_export", "TensorRTConfig", "run_tensorrt",
           "SampleConfig", "run_sample", "EvalConfig", "run_eval", "QualityConfig", "run_bench_quality",
           "SpeedConfig", "run_bench_speed", "ReportConfig", "run_bench_report", "BenchConfig", "run_bench"]
