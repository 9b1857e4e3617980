"""Stand-in for NLTK, for running RULER's reference generator offline in tests (see ``tokenize``)."""
