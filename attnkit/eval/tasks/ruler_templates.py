"""RULER's prompt text, as data: task templates, answer prefixes, needle and document formats, output lengths.

The wording is RULER's (``long_context_eval/data/synthetic/constants.py`` and the generator scripts), typos
included ("assgined"); ``tests/test_ruler_format.py`` checks it against the reference generator. ``{context}`` is
the haystack, ``{query}`` the question's key or value. In RULER the answer prefix is appended to the template; here
it is kept apart (``Sample.answer_prefix``) so that it goes after the chat template's assistant turn.
"""

from __future__ import annotations

# NIAH, several answers ("Some special magic numbers are ..."); {type_v} is plural: numbers, words, uuids.
NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
# NIAH with one answer (num_needle_q * num_needle_v == 1): RULER's singular rewrite; {type_v} is singular.
NIAH_TEMPLATE_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What is the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX_ONE = " The special magic {type_v} for {query} mentioned in the provided text is"
# The needle always names the plural type ("One of the special magic numbers for ... is: ...").
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined "
    "the value {query}, they are: "
)
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

# tokens_to_generate per RULER task type
NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
