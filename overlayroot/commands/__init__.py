"""The ``overlayroot`` command of the booted system (and of an image build): deploy, status,
bless, rollback, gc, etc diff, health checks. Free to use ``subprocess``, ``shutil`` and
``argparse``; never imported by the boot stage."""
