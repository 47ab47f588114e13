"""KFP components: thin interfaces over keel stage functions, one directory per stage."""
