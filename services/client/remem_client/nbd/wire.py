"""NBD wire format: every constant and struct layout of the protocol, and nothing else.

Values follow the NBD protocol specification (NetworkBlockDevice/nbd `doc/proto.md`) and
nbdkit's `common/protocol/nbd-protocol.h`. All integers are big-endian. No other module of
remem spells a magic number, flag bit or header size: they import them from here.

Layouts (sizes in bytes):

    greeting            NBDMAGIC u64, IHAVEOPT u64, handshake flags u16          18
    client flags        u32                                                      4
    option request      IHAVEOPT u64, option u32, length u32, data               16 + length
    option reply        REPLY_MAGIC u64, option u32, reply type u32, length u32  20 + length
    export-name reply   size u64, transmission flags u16, [124 zero bytes]       10 (+124)
    request             REQUEST_MAGIC u32, flags u16, type u16, handle u64,
                        offset u64, length u32, [payload if WRITE]              28 (+length)
    simple reply        SIMPLE_REPLY_MAGIC u32, error u32, handle u64, [data]    16 (+length)
    structured chunk    STRUCTURED_REPLY_MAGIC u32, flags u16, type u16,
                        handle u64, length u32, payload                         20 + length
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum

# --- magics -------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, u16) and client flags (u32) ----------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (u16) -------------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    """Option types sent by the client during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9


class Info(IntEnum):
    """Information types requested in, and answered to, NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request (command) types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


# --- command flags (u16) ------------------------------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- structured replies -------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- error values (the protocol's own numbers; they happen to match Linux errno) ----------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- sizes and limits ---------------------------------------------------------------------
EXPORT_NAME_PADDING = 124  # zero bytes after the NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES
MAX_STRING = 4096  # longest export name / message the spec allows
# Block size constraints advertised with NBD_INFO_BLOCK_SIZE. Minimum 1 is the spec default:
# any byte offset works (the backend does its own read-modify-write); 4 KiB is the page size
# a swap device is written in; 32 MiB is the largest READ/WRITE the spec promises a client.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024
# Longest option data the server accepts before hanging up (a denial-of-service guard the spec
# allows). A real NBD_OPT_GO is 4 + name (<= 4096) + 2 + 2 per information request.
MAX_OPTION_LENGTH = 64 * 1024
MAX_EXPORT_SIZE = (1 << 63) - 1  # sizes are u64 on the wire; keep clear of signed overflow

# --- structs ------------------------------------------------------------------------------
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
NAME_LENGTH = struct.Struct(">I")  # NBD_OPT_INFO/GO name length, NBD_REP_SERVER name length
INFO_COUNT = struct.Struct(">H")  # NBD_OPT_INFO/GO number of information requests
INFO_TYPE = struct.Struct(">H")  # one information request / NBD_INFO_NAME, _DESCRIPTION
INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# A structured NBD_REPLY_TYPE_OFFSET_DATA chunk header followed by its 64-bit offset, packed in
# one go so a read reply is one struct call plus the data.
STRUCTURED_READ = struct.Struct(">IHHQIQ")
OFFSET = struct.Struct(">Q")
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length (message follows)

REQUEST_SIZE = REQUEST.size
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size

# System errno -> NBD error. The backend raises BackendError(errno.X); anything the protocol
# does not define becomes EIO (the I/O failed), except that the spec asks EDQUOT/EFBIG to be
# reported as ENOSPC and a read-only failure as EPERM.
_ERRNO_TO_NBD: dict[int, int] = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(errno_value: int) -> int:
    """Map a system errno to the NBD error value sent on the wire (unknown -> NBD_EIO)."""
    return _ERRNO_TO_NBD.get(errno_value, NBD_EIO)
