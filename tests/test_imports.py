"""``import normswap`` does not import timm or torchvision; their layers are recognised once the user imports them.

Run in fresh interpreters: the test session itself has imported timm long before.
"""

import subprocess
import sys
import textwrap


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_importing_normswap_leaves_timm_and_torchvision_unimported():
    run_python("""
        import sys
        import normswap, normswap.cli
        heavy = [name for name in ("timm", "torchvision", "torch._dynamo") if name in sys.modules]
        assert not heavy, heavy
    """)


def test_timm_and_torchvision_layers_imported_after_normswap_are_converted_and_folded():
    run_python("""
        import torch
        from torch import nn
        import normswap
        from timm.layers import BatchNormAct2d, Conv2dSame
        from torchvision.ops.misc import FrozenBatchNorm2d

        model = nn.Sequential(Conv2dSame(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8))
        plan = normswap.plan(model, "gn", groups=4)
        assert [row.source.rsplit(".", 1)[-1] for row in plan.rows] == ["BatchNormAct2d", "FrozenBatchNorm2d"]
        assert plan.rows[0].target_class == "timm.layers.norm_act.GroupNormAct"
        (back,) = normswap.plan(model, "bn").rows
        assert back.name == "3" and back.target_class == "torch.nn.modules.batchnorm.BatchNorm2d"
        folded = normswap.plan_fold(model.eval())
        assert [pair.conv for pair in folded.pairs] == ["0", "2"], folded
    """)


def test_a_model_without_timm_layers_is_converted_folded_and_recalibrated_without_importing_timm():
    run_python("""
        import sys
        import torch
        from torch import nn
        import normswap

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
        model(torch.randn(2, 3, 8, 8))
        normswap.recalibrate(model, [torch.randn(4, 3, 8, 8)], progress=False)
        normswap.fold(model.eval())
        normswap.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "gn", groups=4)
        assert "timm" not in sys.modules and "torchvision" not in sys.modules
    """)
