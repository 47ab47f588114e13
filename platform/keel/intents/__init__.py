"""Customer-service intents (the ``customer_service_intents`` pipeline): a seeded utterance generator, the
privacy step, fine-tuning all-MiniLM-L6-v2 on Ray Train, compressed variants, a text-in pyfunc and route."""
