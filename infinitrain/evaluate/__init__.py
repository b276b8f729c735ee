"""The long-context evaluations of a trained model: passkey retrieval, perplexity per segment, summarization ROUGE,
classification accuracy (loading and generation live in ``infinitrain.infer``)."""
