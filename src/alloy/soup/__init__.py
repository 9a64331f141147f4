"""Model soups: uniform and greedy averages of fine-tuned checkpoints, chosen by an evaluator.

`greedy_soup` / `uniform_soup` are the selection rules, pure over ingredient ids; `make_soup` runs
them on model folders, scoring candidate soups in memory with `alloy.eval` and writing the chosen
one with `alloy.merge`. A soup of reward models judged by preference accuracy is WARM.
"""

from alloy.soup.checks import SoupInputs, check_inputs, soup_recipe
from alloy.soup.greedy import Selection, Step, greedy_soup, not_worse, rank, uniform_soup
from alloy.soup.kitchen import Kitchen
from alloy.soup.objective import METRICS, Objective, choose_objective, objective_value
from alloy.soup.soup import SoupReport, cook, make_soup, write_soup

__all__ = [
    "METRICS",
    "Kitchen",
    "Objective",
    "Selection",
    "SoupInputs",
    "SoupReport",
    "Step",
    "check_inputs",
    "choose_objective",
    "cook",
    "greedy_soup",
    "make_soup",
    "not_worse",
    "objective_value",
    "rank",
    "soup_recipe",
    "uniform_soup",
    "write_soup",
]
