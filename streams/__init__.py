"""ProfileStream's stream processor: the faust worker and everything around it.

Data flows one way, one module per step::

    records.py  -> validate.py -> batching.py -> state_store.py (lookup)
    -> admission.py -> models.ProfileModel.advance -> state_store.py (write)
    -> publish.py

``processor.py`` runs those steps for one micro-batch; ``app.py`` wires them
into faust; ``worker.py``/``demo.py``/``cli.py`` start it.
"""
