"""The lordba lab: what measures and exercises the library, outside the installed package.

Demo and reproduction (:mod:`.demo`), benchmark suites (:mod:`.bench`), the loader's fuzz harness
(:mod:`.fuzz`), built-in tasks (:mod:`.tasks`), offline assets (:mod:`.assets`), low-bit LoRA
baselines (:mod:`.baselines`) and the end-to-end training job (:mod:`.train_job`). Its commands
(``lordba demo``, ``bench``, ``fuzz``, ``reproduce``, ``fetch-assets``, ``train``) join the ``lordba``
command line through the ``lordba.commands`` entry points. The library never imports the lab.
"""
