"""python -m reap_stream.cli"""
from . import main

main()
