"""Stage 5, allocation: targets, the budgeted multiple-choice knapsack and the recommendation."""
