"""Names and numbers shared by the public ops and their backends; imports nothing of the project."""

RULES = ("gradient", "deconvnet", "guided")
# The ReLU rules as the C++ and Triton kernels number them.
RULE_CODES = {"gradient": 0, "deconvnet": 1, "guided": 2}
