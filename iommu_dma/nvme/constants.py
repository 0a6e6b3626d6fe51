"""NVMe numbers, in one table: opcodes, CNS values, log page and feature identifiers, status
code types and codes, Identify Controller capability bits and command limits.

"Base" is the NVM Express Base Specification 2.0, "NVM" the NVM Command Set Specification 1.0.
Controller registers (BAR0 offsets and fields) live in iommu_dma.nvme.regs; status names
and decoding in iommu_dma.nvme.status.
"""

from __future__ import annotations

# ---- Admin Command Set opcodes (Base §5, figure "Opcodes for Admin Commands") ---------------
ADM_DELETE_IO_SQ = 0x00              # Delete I/O Submission Queue, Base §5.7
ADM_CREATE_IO_SQ = 0x01              # Create I/O Submission Queue, Base §5.5
ADM_GET_LOG_PAGE = 0x02              # Get Log Page, Base §5.16
ADM_DELETE_IO_CQ = 0x04              # Delete I/O Completion Queue, Base §5.6
ADM_CREATE_IO_CQ = 0x05              # Create I/O Completion Queue, Base §5.4
ADM_IDENTIFY = 0x06                  # Identify, Base §5.17
ADM_ABORT = 0x08                     # Abort, Base §5.1
ADM_SET_FEATURES = 0x09              # Set Features, Base §5.27
ADM_GET_FEATURES = 0x0A              # Get Features, Base §5.15
ADM_ASYNC_EVENT_REQUEST = 0x0C       # Asynchronous Event Request, Base §5.2
ADM_FW_COMMIT = 0x10                 # Firmware Commit, Base §5.12
ADM_FW_IMAGE_DOWNLOAD = 0x11         # Firmware Image Download, Base §5.13
ADM_DEVICE_SELF_TEST = 0x14          # Device Self-test, Base §5.10
ADM_NS_ATTACHMENT = 0x15             # Namespace Attachment, Base §5.19
ADM_NS_MANAGEMENT = 0x0D             # Namespace Management, Base §5.20
ADM_KEEP_ALIVE = 0x18                # Keep Alive, Base §5.18
ADM_SECURITY_SEND = 0x81             # Security Send, Base §5.26
ADM_SECURITY_RECEIVE = 0x82          # Security Receive, Base §5.25
ADM_SANITIZE = 0x84                  # Sanitize, Base §5.24
ADM_DOORBELL_BUFFER_CONFIG = 0x7C    # Doorbell Buffer Config, Base §5.11
ADM_FORMAT_NVM = 0x80                # Format NVM, Base §5.14

# ---- NVM Command Set I/O opcodes (NVM §3, figure "Opcodes for NVM Commands") ---------------
OPC_FLUSH = 0x00                     # Flush, Base §7.1 (no data)
OPC_WRITE = 0x01                     # Write, NVM §3
OPC_READ = 0x02                      # Read, NVM §3
OPC_WRITE_UNCORRECTABLE = 0x04       # Write Uncorrectable, NVM §3
OPC_COMPARE = 0x05                   # Compare, NVM §3
OPC_WRITE_ZEROES = 0x08              # Write Zeroes, NVM §3
OPC_DSM = 0x09                       # Dataset Management, NVM §3
OPC_VERIFY = 0x0C                    # Verify, NVM §3
OPC_COPY = 0x19                      # Copy, NVM §3.3.1

# ---- command fields and limits ------------------------------------------------------------
NSID_ALL = 0xFFFFFFFF                # broadcast NSID: every namespace (Base §3.2.1)
MAX_NLB = 1 << 16                    # NLB, CDW12 15:0, is 0's based (NVM §3)
DSM_MAX_RANGES = 256                 # DSM NR, CDW10 7:0, is 0's based (NVM §3)
DSM_IDR = 1 << 0                     # DSM CDW11: integral dataset for read (NVM §3)
DSM_IDW = 1 << 1                     # DSM CDW11: integral dataset for write
DSM_AD = 1 << 2                      # DSM CDW11: deallocate

# Get Features SEL, CDW10 10:8 (Base §5.15, figure "Select")
SEL_CURRENT = 0
SEL_DEFAULT = 1
SEL_SAVED = 2
SEL_CAPABILITIES = 3

# ---- Identify CNS values, CDW10 7:0 (Base §5.17, figure "CNS Values") ------------------------
CNS_NAMESPACE = 0x00                 # Identify Namespace (NVM Command Set specific)
CNS_CONTROLLER = 0x01                # Identify Controller, Base §5.17.2
CNS_ACTIVE_NS_LIST = 0x02            # Active Namespace ID list, Base §5.17.2
CNS_NS_DESCRIPTORS = 0x03            # Namespace Identification Descriptors
CNS_ALLOCATED_NS_LIST = 0x10         # Allocated Namespace ID list (NSIDs above CDW1 NSID)
CNS_ALLOCATED_NAMESPACE = 0x11       # Identify Namespace of an allocated NSID
CNS_NS_CTRL_LIST = 0x12              # Controllers attached to the namespace in NSID
CNS_CTRL_LIST = 0x13                 # Controllers in the NVM subsystem

# ---- log page identifiers, Get Log Page CDW10 7:0 (Base §5.16.1, "Log Page Identifiers") ---
LID_ERROR = 0x01                     # Error Information
LID_SMART = 0x02                     # SMART / Health Information
LID_FW_SLOT = 0x03                   # Firmware Slot Information
LID_CHANGED_NS_LIST = 0x04           # Changed Namespace List
LID_CMD_EFFECTS = 0x05               # Commands Supported and Effects
LID_DEVICE_SELF_TEST = 0x06          # Device Self-test
LID_PERSISTENT_EVENT = 0x0D          # Persistent Event Log

# ---- feature identifiers, Set/Get Features CDW10 7:0 (Base §5.27.1, "Feature Identifiers") -
FID_ARBITRATION = 0x01
FID_POWER_MANAGEMENT = 0x02
FID_LBA_RANGE_TYPE = 0x03            # NVM Command Set specific
FID_TEMPERATURE_THRESHOLD = 0x04
FID_ERROR_RECOVERY = 0x05
FID_VOLATILE_WRITE_CACHE = 0x06
FID_NUMBER_OF_QUEUES = 0x07          # CDW11 NCQR 31:16, NSQR 15:0, both 0's based
FID_INTERRUPT_COALESCING = 0x08
FID_INTERRUPT_VECTOR_CONFIG = 0x09
FID_WRITE_ATOMICITY = 0x0A
FID_ASYNC_EVENT_CONFIG = 0x0B
FID_APST = 0x0C                      # Autonomous Power State Transition
FID_HOST_MEMORY_BUFFER = 0x0D
FID_TIMESTAMP = 0x0E
FID_KEEP_ALIVE_TIMER = 0x0F
FID_HOST_THERMAL_MGMT = 0x10         # Host Controlled Thermal Management
FID_NON_OP_POWER_STATE = 0x11        # Non-Operational Power State Config
FID_READ_RECOVERY_LEVEL = 0x12       # Read Recovery Level Config
FID_PLM_CONFIG = 0x13                # Predictable Latency Mode Config (data buffer)
FID_PLM_WINDOW = 0x14                # Predictable Latency Mode Window
FID_LBA_STATUS_ATTRS = 0x15          # LBA Status Information Report Interval
FID_HOST_BEHAVIOR = 0x16             # Host Behavior Support (data buffer)
FID_SANITIZE_CONFIG = 0x17           # Sanitize Config
FID_ENDURANCE_EVENT_CONFIG = 0x18    # Endurance Group Event Configuration
FID_IOCS_PROFILE = 0x19              # I/O Command Set Profile
FID_SPINUP_CONTROL = 0x1A            # Spinup Control
FID_ENH_CTRL_METADATA = 0x7D         # Enhanced Controller Metadata (data buffer)
FID_CTRL_METADATA = 0x7E             # Controller Metadata (data buffer)
FID_NS_METADATA = 0x7F               # Namespace Metadata (data buffer)
FID_SW_PROGRESS = 0x80               # Software Progress Marker
FID_HOST_ID = 0x81                   # Host Identifier (data buffer)
FID_RESV_MASK = 0x82                 # Reservation Notification Mask
FID_RESV_PERSIST = 0x83              # Reservation Persistence
FID_WRITE_PROTECT = 0x84             # Namespace Write Protection Config

# ---- Status Code Type, CQE DW3 27:25 (Base §4.6.1.1, "Status Code Type Values") -------------
SCT_GENERIC = 0                      # Generic Command Status
SCT_CMD_SPECIFIC = 1                 # Command Specific Status
SCT_MEDIA = 2                        # Media and Data Integrity Errors
SCT_PATH = 3                         # Path Related Status
SCT_VENDOR = 7                       # Vendor Specific

# ---- Status Codes, CQE DW3 24:17 (Base §4.6.1.2; 80h-BFh are defined per I/O command set, here
# the NVM Command Set's). The ones this driver names; every name is in iommu_dma.nvme.status --
# SCT_GENERIC
SC_SUCCESS = 0x00                    # Successful Completion
SC_INVALID_OPCODE = 0x01             # Invalid Command Opcode
SC_INVALID_FIELD = 0x02              # Invalid Field in Command
SC_DATA_TRANSFER_ERROR = 0x04        # Data Transfer Error
SC_INTERNAL_ERROR = 0x06             # Internal Error
SC_ABORTED_SQ_DELETION = 0x08        # Command Aborted due to SQ Deletion
SC_INVALID_NS_OR_FORMAT = 0x0B       # Invalid Namespace or Format
SC_LBA_OUT_OF_RANGE = 0x80           # LBA Out of Range (NVM)
SC_CAPACITY_EXCEEDED = 0x81          # Capacity Exceeded (NVM)
SC_NS_NOT_READY = 0x82               # Namespace Not Ready (NVM): transient
SC_FORMAT_IN_PROGRESS = 0x84         # Format In Progress (NVM): transient
# SCT_CMD_SPECIFIC
SC_INVALID_QUEUE_ID = 0x01           # Invalid Queue Identifier (Create I/O SQ/CQ)
SC_INVALID_QUEUE_SIZE = 0x02         # Invalid Queue Size (Create I/O SQ/CQ)
SC_INVALID_LOG_PAGE = 0x09           # Invalid Log Page (Get Log Page)
SC_INVALID_FORMAT = 0x0A             # Invalid Format (Format NVM)
# SCT_MEDIA
SC_WRITE_FAULT = 0x80                # Write Fault
SC_UNRECOVERED_READ_ERROR = 0x81     # Unrecovered Read Error
SC_COMPARE_FAILURE = 0x85            # Compare Failure: the blocks differ (NVM Compare)
# SCT_PATH
SC_INTERNAL_PATH_ERROR = 0x00        # Internal Path Error: transient

# ---- Identify Controller OACS, bytes 257:256 (Base §5.17.2.1, figure "Identify Controller") -
OACS_SECURITY = 1 << 0               # Security Send / Security Receive
OACS_FORMAT_NVM = 1 << 1             # Format NVM
OACS_FW_DOWNLOAD = 1 << 2            # Firmware Commit / Firmware Image Download
OACS_NS_MANAGEMENT = 1 << 3          # Namespace Management / Attachment
OACS_DEVICE_SELF_TEST = 1 << 4       # Device Self-test
OACS_DIRECTIVES = 1 << 5             # Directive Send / Directive Receive
OACS_NVME_MI = 1 << 6                # NVMe-MI Send / NVMe-MI Receive
OACS_VIRTUALIZATION = 1 << 7         # Virtualization Management
OACS_DBBUF = 1 << 8                  # Doorbell Buffer Config (shadow doorbells)

# ---- Identify Controller ONCS, bytes 521:520 (Base §5.17.2.1) --------------------------------
ONCS_COMPARE = 1 << 0                # Compare
ONCS_WRITE_UNCORRECTABLE = 1 << 1    # Write Uncorrectable
ONCS_DSM = 1 << 2                    # Dataset Management
ONCS_WRITE_ZEROES = 1 << 3           # Write Zeroes
ONCS_SAVE_FEATURES = 1 << 4          # the Save field of Set/Get Features
ONCS_RESERVATIONS = 1 << 5           # Reservations
ONCS_TIMESTAMP = 1 << 6              # Timestamp feature
ONCS_VERIFY = 1 << 7                 # Verify
ONCS_COPY = 1 << 8                   # Copy
