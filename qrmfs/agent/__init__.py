"""The storage-side half of qrmfs: code that runs where the image lives.

Everything in this package uses the Python standard library only: `qrmfs.storage` ships these modules
over ssh to the storage server (`python3 -c BOOTSTRAP`, sources on stdin) or runs them locally for a
local target, so each rule about an image's tree is written once and runs next to the data.
"""
