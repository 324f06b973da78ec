"""dermnode: a headless DICOM AI evidence creator for dermoscopy.

Data flow, one way: receive (network.scp) -> journal (intake) -> process
(pipeline) -> encode (evidence) -> send (network.scu).
"""

__version__ = "0.1.0"
