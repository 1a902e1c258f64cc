"""Workarounds for the libraries dicom-node builds on, fenced one library behaviour per module.

Each module here is the only code in :mod:`dicom_node` that patches a library, subclasses its
internals, reads its private modules or changes its process-wide state; each starts with what
upstream does, the upstream issue (or that none was found), and when the module can be removed.
Code elsewhere calls these modules' functions and classes, never the internals behind them.

- :mod:`dicom_node.compat.highdicom_iod`: highdicom's lookup of an attribute in an IOD,
  memoised.
- :mod:`dicom_node.compat.highdicom_tables`: highdicom's tables of the standard (IODs, modules,
  attributes, anatomic regions), typed.
- :mod:`dicom_node.compat.pynetdicom_server`: pynetdicom's association server, with a bounded
  PDU read, socket timeouts, the TLS handshake off the accept loop and every association's end.
- :mod:`dicom_node.compat.pynetdicom_send`: pynetdicom's switch for streaming a file's data set
  from disk in C-STORE.
"""
