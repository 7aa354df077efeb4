"""The learned cost model survives a restart, and only where it was learned."""

from __future__ import annotations

from mace_sgl.policy.cost import CostModel, Observation
from mace_sgl.trainer import learned_cost


def trained_model() -> CostModel:
    cost = CostModel()
    for _ in range(300):
        cost.observe(Observation("decode", 0.25, batch=2, context=200))
    return cost


def test_a_restart_resumes_the_learned_weights(tmp_path):
    key = learned_cost.key("built-in defaults", "/m", "cpu", 2)
    cost = trained_model()
    saver = learned_cost.CostSaver(tmp_path / learned_cost.FILE, key, cost, resumed=False)
    assert not saver.maybe_save(now=saver.saved_at + 1)  # rate-limited
    assert saver.maybe_save(now=saver.saved_at + learned_cost.SAVE_EVERY_S)
    back = learned_cost.load(tmp_path / learned_cost.FILE, key)
    assert back is not None
    fresh = CostModel().predict("decode", batch=2, context=200)
    assert abs(fresh - 0.25) > 0.05  # the defaults are far off: the test can fail
    assert abs(back.predict("decode", batch=2, context=200) - 0.25) < 0.01


def test_a_model_learned_elsewhere_or_corrupt_is_ignored(tmp_path):
    path = tmp_path / learned_cost.FILE
    key = learned_cost.key("built-in defaults", "/m", "cpu", 2)
    learned_cost.CostSaver(path, key, trained_model(), resumed=False).save()
    for other in (
        learned_cost.key("built-in defaults", "/m", "cuda", 2),
        learned_cost.key("built-in defaults", "/other", "cpu", 2),
        learned_cost.key("/profile.json", "/m", "cpu", 2),
        learned_cost.key("built-in defaults", "/m", "cpu", 16),
    ):
        assert learned_cost.load(path, other) is None
    assert learned_cost.load(tmp_path / "missing.json", key) is None
    path.write_text('{"key": ')
    assert learned_cost.load(path, key) is None


def test_a_failed_save_is_counted_not_raised(tmp_path):
    key = learned_cost.key("built-in defaults", "/m", "cpu", 2)
    saver = learned_cost.CostSaver(tmp_path / "no" / "dir" / "f.json", key, CostModel(), False)
    assert not saver.save()
    assert saver.status() == {"resumed": False, "saves": 0, "failures": 1}
