"""Policies turn decision-point scores into actions; calibration fits them to a compute budget."""

from dynets.policies.exit_policies import (
    POLICIES,
    ConfidencePolicy,
    EntropyPolicy,
    ExitPolicy,
    LearnedPolicy,
    NeverExitPolicy,
    PatiencePolicy,
    ThresholdPolicy,
    make_policy,
    policy_from_dict,
)

__all__ = [
    "POLICIES",
    "ConfidencePolicy",
    "EntropyPolicy",
    "ExitPolicy",
    "LearnedPolicy",
    "NeverExitPolicy",
    "PatiencePolicy",
    "ThresholdPolicy",
    "make_policy",
    "policy_from_dict",
]
