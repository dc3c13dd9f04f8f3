"""Results beside the paper's: the reference numbers with their sources, the claims checked
over seeds, the metric and curve files DVC reads, and one plotting style."""

from .claims import Claim, Verdict, claims_markdown, claims_table, fmt_mean_se, judge, judge_threshold
from .files import make_output_dir, write_curves, write_metrics
from .paper import PAPER
from .style import departures, flatten, print_setup, use_style

__all__ = ["PAPER", "write_metrics", "write_curves", "use_style", "make_output_dir", "print_setup", "departures",
           "flatten", "Claim", "Verdict", "judge", "judge_threshold", "claims_markdown", "claims_table", "fmt_mean_se"]
