"""Device memory: the model of what each stage needs, the planner that fits a budget, and block streaming."""
