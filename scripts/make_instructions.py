"""Generate the embedded instruction set: qlora/assets/instructions.jsonl and instructions_prompts.json.

    .venv/bin/python scripts/make_instructions.py

Alpaca rows {"instruction": "Write a function that ...", "output": "<short Python code>"},
the data `qlora train` fine-tunes on when given no arguments. Each task below has several
phrasings, function names and argument names; rows are drawn from their combinations with
a fixed seed, so the output is byte-identical on every run. When the instruction names the
function or its arguments, the code uses those names (something to learn to copy); otherwise
the task's first name and arguments. Every generated function is executed against the
task's test cases before it is written, so the code is correct, not just plausible.
DEMO_PROMPTS are held out (asserted absent from the rows): the before/after generations of
`qlora train` use them to show what the adapter learned.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qlora" / "assets"
ROWS_PER_TASK = 10
SEED = 0
VERBS = ["Write a function", "Write a function", "Write a Python function", "Create a function",
         "Implement a function", "Define a function"]

DEMO_PROMPTS = [
    "Write a function that reverses a string.",
    "Write a function called `is_palindrome` that checks whether a string is a palindrome.",
    "Write a function that returns the factorial of n.",
    "Write a function named count_vowels that counts the vowels in a string.",
    "Write a function that returns the largest number in a list.",
]


@dataclass
class Task:
    what: list[str]  # completes "Write a function that ...": may mention {a}, {b}, ... (the arguments)
    names: list[str]  # function names; names[0] when the instruction does not name it
    params: list[tuple[str, ...]]  # argument names; params[0] when the instruction does not name them
    body: str  # function body, with {a}, {b}, ... for the arguments
    tests: list[tuple[tuple, object]]  # (arguments, expected result)


T = Task
TASKS = [
    T(["adds two numbers", "returns the sum of two numbers", "returns {a} plus {b}", "adds {a} and {b}"],
      ["add", "add_numbers", "sum_two", "plus"], [("a", "b"), ("x", "y"), ("first", "second")],
      "return {a} + {b}", [((2, 3), 5), ((-4, 4), 0)]),
    T(["subtracts one number from another", "returns {a} minus {b}", "returns the difference of two numbers"],
      ["subtract", "minus", "difference"], [("a", "b"), ("x", "y"), ("left", "right")],
      "return {a} - {b}", [((5, 3), 2), ((0, 7), -7)]),
    T(["multiplies two numbers", "returns the product of two numbers", "returns {a} times {b}"],
      ["multiply", "product", "times"], [("a", "b"), ("x", "y"), ("m", "n")],
      "return {a} * {b}", [((4, 5), 20), ((-2, 3), -6)]),
    T(["returns the square of a number", "squares a number", "returns {a} squared"],
      ["square", "squared", "sq"], [("x",), ("n",), ("value",)],
      "return {a} * {a}", [((3,), 9), ((-4,), 16)]),
    T(["returns the larger of two numbers", "returns the maximum of {a} and {b}", "returns the bigger of two values"],
      ["larger", "max_of_two", "bigger"], [("a", "b"), ("x", "y"), ("first", "second")],
      "if {a} > {b}:\n    return {a}\nreturn {b}", [((2, 9), 9), ((7, -1), 7)]),
    T(["returns the smaller of two numbers", "returns the minimum of {a} and {b}", "returns the lesser of two values"],
      ["smaller", "min_of_two", "lesser"], [("a", "b"), ("x", "y"), ("first", "second")],
      "if {a} < {b}:\n    return {a}\nreturn {b}", [((2, 9), 2), ((7, -1), -1)]),
    T(["returns the absolute value of a number", "returns {a} without its sign"],
      ["absolute", "abs_value", "magnitude"], [("x",), ("n",), ("number",)],
      "if {a} < 0:\n    return -{a}\nreturn {a}", [((-3,), 3), ((5,), 5)]),
    T(["checks whether a number is even", "returns True if {a} is even", "tells if an integer is even"],
      ["is_even", "even", "check_even"], [("n",), ("x",), ("number",)],
      "return {a} % 2 == 0", [((4,), True), ((7,), False)]),
    T(["checks whether a number is odd", "returns True if {a} is odd", "tells if an integer is odd"],
      ["is_odd", "odd", "check_odd"], [("n",), ("x",), ("number",)],
      "return {a} % 2 == 1", [((3,), True), ((8,), False)]),
    T(["reverses a string", "returns a string backwards", "returns {a} reversed"],
      ["reverse", "reverse_string", "backwards", "flip"], [("s",), ("text",), ("word",)],
      "return {a}[::-1]", [(("abc",), "cba"), (("",), "")]),
    T(["checks whether a string is a palindrome", "returns True if {a} reads the same backwards",
       "tells if a word is a palindrome"],
      ["is_palindrome", "palindrome", "check_palindrome"], [("s",), ("word",), ("text",)],
      "return {a} == {a}[::-1]", [(("level",), True), (("abc",), False)]),
    T(["counts the vowels in a string", "returns the number of vowels in {a}", "counts how many vowels a word has"],
      ["count_vowels", "vowels", "num_vowels"], [("s",), ("text",), ("word",)],
      "count = 0\nfor c in {a}.lower():\n    if c in \"aeiou\":\n        count += 1\nreturn count",
      [(("Hello",), 2), (("xyz",), 0)]),
    T(["returns the largest number in a list", "finds the maximum of a list", "returns the biggest item of {a}"],
      ["largest", "max_in_list", "find_max", "biggest"], [("numbers",), ("xs",), ("values",)],
      "best = {a}[0]\nfor x in {a}:\n    if x > best:\n        best = x\nreturn best",
      [(([3, 9, 2],), 9), (([-5, -2],), -2)]),
    T(["returns the smallest number in a list", "finds the minimum of a list", "returns the smallest item of {a}"],
      ["smallest", "min_in_list", "find_min"], [("numbers",), ("xs",), ("values",)],
      "best = {a}[0]\nfor x in {a}:\n    if x < best:\n        best = x\nreturn best",
      [(([3, 9, 2],), 2), (([-5, -2],), -5)]),
    T(["returns the sum of a list of numbers", "adds up all the numbers in a list", "returns the total of {a}"],
      ["total", "sum_list", "add_all"], [("numbers",), ("xs",), ("values",)],
      "total = 0\nfor x in {a}:\n    total += x\nreturn total", [(([1, 2, 3],), 6), (([],), 0)]),
    T(["returns the average of a list of numbers", "computes the mean of a list", "returns the mean of {a}"],
      ["average", "mean", "avg"], [("numbers",), ("xs",), ("values",)],
      "return sum({a}) / len({a})", [(([1, 2, 3],), 2), (([4],), 4)]),
    T(["returns the factorial of a number", "computes {a} factorial", "returns the product of 1 to {a}"],
      ["factorial", "fact"], [("n",), ("k",), ("number",)],
      "result = 1\nfor i in range(2, {a} + 1):\n    result *= i\nreturn result", [((5,), 120), ((0,), 1)]),
    T(["returns the nth Fibonacci number", "computes the Fibonacci number {a}", "returns Fibonacci of {a}"],
      ["fibonacci", "fib", "nth_fibonacci"], [("n",), ("k",), ("index",)],
      "a, b = 0, 1\nfor _ in range({a}):\n    a, b = b, a + b\nreturn a", [((10,), 55), ((1,), 1)]),
    T(["flattens a list of lists", "turns a nested list into a flat list", "flattens {a} into one list"],
      ["flatten", "flat", "flatten_list"], [("lists",), ("nested",), ("rows",)],
      "result = []\nfor sub in {a}:\n    for x in sub:\n        result.append(x)\nreturn result",
      [(([[1, 2], [3]],), [1, 2, 3]), (([],), [])]),
    T(["counts how many times an item appears in a list", "returns the number of times {b} occurs in {a}"],
      ["count_item", "occurrences", "count_of"], [("items", "target"), ("xs", "x"), ("values", "value")],
      "count = 0\nfor item in {a}:\n    if item == {b}:\n        count += 1\nreturn count",
      [(([1, 2, 1], 1), 2), ((["a"], "b"), 0)]),
    T(["removes duplicates from a list, keeping the order", "returns {a} without repeated items",
       "returns the unique items of a list in order"],
      ["dedupe", "unique", "remove_duplicates"], [("items",), ("xs",), ("values",)],
      "seen = set()\nresult = []\nfor x in {a}:\n    if x not in seen:\n        seen.add(x)\n"
      "        result.append(x)\nreturn result", [(([3, 1, 3, 2, 1],), [3, 1, 2]), (([],), [])]),
    T(["converts a string to upper case", "returns {a} in capital letters", "makes a string uppercase"],
      ["shout", "to_upper", "upper"], [("s",), ("text",), ("word",)],
      "return {a}.upper()", [(("hi",), "HI")]),
    T(["counts the words in a sentence", "returns the number of words in {a}", "counts how many words a string has"],
      ["count_words", "word_count", "num_words"], [("sentence",), ("text",), ("s",)],
      "return len({a}.split())", [(("a b  c",), 3), (("",), 0)]),
    T(["returns the squares of a list of numbers", "squares every number in a list", "returns each item of {a} squared"],
      ["squares", "square_all", "squared_list"], [("numbers",), ("xs",), ("values",)],
      "return [x * x for x in {a}]", [(([1, 2, 3],), [1, 4, 9])]),
    T(["keeps only the even numbers of a list", "returns the even numbers in {a}", "filters out the odd numbers"],
      ["evens", "only_even", "filter_even"], [("numbers",), ("xs",), ("values",)],
      "return [x for x in {a} if x % 2 == 0]", [(([1, 2, 3, 4],), [2, 4])]),
    T(["checks whether a number is prime", "returns True if {a} is a prime number", "tells if an integer is prime"],
      ["is_prime", "prime", "check_prime"], [("n",), ("x",), ("number",)],
      "if {a} < 2:\n    return False\nfor i in range(2, int({a} ** 0.5) + 1):\n    if {a} % i == 0:\n"
      "        return False\nreturn True", [((7,), True), ((9,), False), ((1,), False), ((2,), True)]),
    T(["returns the greatest common divisor of two numbers", "computes the gcd of {a} and {b}"],
      ["gcd", "greatest_common_divisor"], [("a", "b"), ("x", "y"), ("m", "n")],
      "while {b}:\n    {a}, {b} = {b}, {a} % {b}\nreturn {a}", [((12, 18), 6), ((7, 5), 1)]),
    T(["converts Celsius to Fahrenheit", "turns a temperature in Celsius into Fahrenheit",
       "returns {a} degrees Celsius in Fahrenheit"],
      ["to_fahrenheit", "celsius_to_fahrenheit", "c_to_f"], [("celsius",), ("c",), ("degrees",)],
      "return {a} * 9 / 5 + 32", [((100,), 212), ((0,), 32)]),
    T(["returns the length of the longest word in a sentence", "finds how long the longest word of {a} is"],
      ["longest_word", "max_word_length", "longest"], [("sentence",), ("text",), ("s",)],
      "best = 0\nfor word in {a}.split():\n    if len(word) > best:\n        best = len(word)\nreturn best",
      [(("a bb ccc",), 3), (("",), 0)]),
    T(["returns the first item of a list", "returns the head of {a}", "gets the first element of a list"],
      ["first", "head", "first_item"], [("items",), ("xs",), ("values",)],
      "return {a}[0]", [(([4, 5],), 4)]),
    T(["returns the last item of a list", "returns the final element of {a}", "gets the last element of a list"],
      ["last", "tail_item", "last_item"], [("items",), ("xs",), ("values",)],
      "return {a}[-1]", [(([4, 5],), 5)]),
    T(["joins a list of words with commas", "returns the strings in {a} separated by commas"],
      ["join_words", "comma_join", "to_csv"], [("words",), ("items",), ("names",)],
      "return \", \".join({a})", [((["a", "b"],), "a, b")]),
    T(["sorts a list from largest to smallest", "returns {a} sorted in descending order",
       "sorts numbers in reverse order"],
      ["sort_desc", "descending", "sort_reverse"], [("numbers",), ("xs",), ("values",)],
      "return sorted({a}, reverse=True)", [(([2, 9, 4],), [9, 4, 2])]),
    T(["counts how often each character appears in a string", "returns a dict of character counts for {a}"],
      ["char_counts", "count_chars", "letter_frequency"], [("s",), ("text",), ("word",)],
      "counts = {{}}\nfor c in {a}:\n    counts[c] = counts.get(c, 0) + 1\nreturn counts",
      [(("abca",), {"a": 2, "b": 1, "c": 1})]),
    T(["checks whether a list is sorted", "returns True if {a} is in ascending order"],
      ["is_sorted", "sorted_check", "in_order"], [("items",), ("xs",), ("numbers",)],
      "for i in range(1, len({a})):\n    if {a}[i - 1] > {a}[i]:\n        return False\nreturn True",
      [(([1, 2, 2, 5],), True), (([3, 1],), False)]),
    T(["returns the sum of the digits of a number", "adds up the digits of {a}"],
      ["digit_sum", "sum_digits", "add_digits"], [("n",), ("number",), ("x",)],
      "total = 0\nwhile {a} > 0:\n    total += {a} % 10\n    {a} //= 10\nreturn total", [((1234,), 10), ((0,), 0)]),
    T(["raises a number to a power", "returns {a} to the power of {b}"],
      ["power", "pow_of", "raise_to"], [("base", "exponent"), ("x", "n"), ("a", "b")],
      "return {a} ** {b}", [((2, 10), 1024), ((5, 0), 1)]),
    T(["returns the area of a rectangle", "computes the area of a rectangle of {a} by {b}"],
      ["area", "rectangle_area", "rect_area"], [("width", "height"), ("w", "h"), ("a", "b")],
      "return {a} * {b}", [((3, 4), 12)]),
    T(["checks whether a string contains another string", "returns True if {b} appears in {a}"],
      ["contains", "has_substring", "includes"], [("text", "part"), ("s", "sub"), ("haystack", "needle")],
      "return {b} in {a}", [(("hello", "ell"), True), (("abc", "d"), False)]),
    T(["greets a person by name", "returns a greeting for {a}", "says hello to someone"],
      ["greet", "hello", "say_hello"], [("name",), ("person",), ("who",)],
      "return \"Hello, \" + {a} + \"!\"", [(("Ada",), "Hello, Ada!")]),
    T(["counts the numbers in a list that are greater than a limit", "returns how many items of {a} exceed {b}"],
      ["count_above", "count_greater", "above"], [("numbers", "limit"), ("xs", "n"), ("values", "threshold")],
      "count = 0\nfor x in {a}:\n    if x > {b}:\n        count += 1\nreturn count", [(([1, 5, 9], 4), 2)]),
]


def render(task: Task, name: str, params: tuple[str, ...]) -> str:
    roles = dict(zip("abcd", params))
    body = task.body.format(**roles)
    return f"def {name}({', '.join(params)}):\n" + "\n".join("    " + line for line in body.split("\n"))


def check(task: Task, code: str, name: str, where: str) -> None:
    scope: dict = {}
    exec(code, scope)
    for args, expected in task.tests:
        got = scope[name](*[list(a) if isinstance(a, list) else a for a in args])
        assert got == expected, f"{where}: {name}{args} = {got!r}, expected {expected!r}\n{code}"


def instructions(task: Task, rng: random.Random) -> list[dict]:
    """Up to ROWS_PER_TASK distinct (instruction, code) rows for one task."""
    options = []
    for what, name_mode, params in itertools.product(task.what, ("default", "called", "named"), task.params):
        if "{" not in what and params != task.params[0]:
            continue  # the arguments are not named: use the defaults
        for name in (task.names if name_mode != "default" else task.names[:1]):
            options.append((what, name_mode, name, params))
    rng.shuffle(options)
    rows, seen = [], set()
    for what, name_mode, name, params in options:
        verb = rng.choice(VERBS)
        naming = {"default": "", "called": f"called `{name}` ", "named": f"named {name} "}[name_mode]
        text = f"{verb} {naming}that {what.format(**dict(zip('abcd', params)))}."
        if text in seen or text in DEMO_PROMPTS:
            continue
        seen.add(text)
        code = render(task, name, params)
        check(task, code, name, text)
        rows.append({"instruction": text, "output": code})
        if len(rows) == ROWS_PER_TASK:
            break
    return rows


def main() -> None:
    rng = random.Random(SEED)
    rows = [row for task in TASKS for row in instructions(task, rng)]
    rng.shuffle(rows)
    assert not {r["instruction"] for r in rows} & set(DEMO_PROMPTS)
    ASSETS.mkdir(parents=True, exist_ok=True)
    with open(ASSETS / "instructions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (ASSETS / "instructions_prompts.json").write_text(json.dumps(DEMO_PROMPTS, indent=2) + "\n")
    longest = max(len(r["output"]) for r in rows)
    print(f"wrote {len(rows)} rows from {len(TASKS)} tasks to {ASSETS / 'instructions.jsonl'} "
          f"(longest output {longest} chars); {len(DEMO_PROMPTS)} held-out prompts to {ASSETS / 'instructions_prompts.json'}")


if __name__ == "__main__":
    main()
