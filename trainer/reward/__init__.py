"""What a response is worth: its answer checked against the gold one, times a length penalty against its budget.

answers.py            AnswerChecker: scores responses, never raising or hanging (math-verify in time-limited workers)
answer_extraction.py  the final answer of a response: its last box or last number
answer_equality.py    whether two answers are equal (exact_match in-process, math_equal via math-verify)
rewards.py            the length penalties: correctness times a penalty, per group, against its budget
budgets.py            per-prompt length budgets: DA-DLER's (difficulty), DRQA's (data file, LABELS), scheduled ones
"""
