"""Recommendations from implicit feedback: the ``ecommerce_recommendations`` pipeline's stages.

``data`` generates or reads interactions and holds out each user's latest
ones; ``model`` is matrix factorization scored with a BPR ranking loss;
``train`` fits it on Ray Train; ``metrics`` ranks the held-out items against
a most-popular baseline and gates on NDCG@k; ``registry`` logs a pyfunc that
answers top-k item ids for user ids.
"""
