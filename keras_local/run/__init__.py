"""Running a training job: ``training`` (prepare and train a run), ``callbacks`` (what a run
writes each epoch), ``resume`` and ``model_files`` (reading back what a run wrote),
``json_files`` (atomic JSON files), ``distribute`` (tf.distribute strategies),
``plugins`` (user modules registering models and losses) and ``quiet`` (a quiet start)."""
