"""The operating threshold rule: recall first, then the false-positive budget."""
from platemask.training.evaluate import choose_threshold


def _curve(rows):
    return [{"threshold": t, "recall": r, "false_positive_image_rate": fp} for t, r, fp in rows]


def test_highest_recall_within_both_targets():
    curve = _curve([(0.2, 0.97, 0.08), (0.3, 0.96, 0.015), (0.4, 0.96, 0.015), (0.5, 0.952, 0.015), (0.6, 0.94, 0.0)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.4 and "highest recall" in why  # 0.2 breaks the FP budget; 0.3 and 0.4 tie on recall


def test_recall_is_kept_when_no_threshold_meets_the_fp_budget():
    curve = _curve([(0.3, 0.96, 0.09), (0.5, 0.952, 0.077), (0.7, 0.91, 0.031)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.5 and "no threshold meets the FP limit" in why


def test_best_recall_within_budget_when_the_recall_target_is_out_of_reach():
    curve = _curve([(0.3, 0.93, 0.05), (0.5, 0.92, 0.02), (0.7, 0.90, 0.0)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.5 and "no threshold reaches recall" in why
