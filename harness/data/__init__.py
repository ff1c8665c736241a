"""Edit data: CounterFact (ROME and EasyEdit schemas) and ZsRE (MEND schema) as EditRequests."""

from harness.data.edits import (  # noqa: F401
    DataSourceError,
    EditRequest,
    MalformedRecordError,
    load_counterfact,
    load_edit_data,
    load_zsre,
    parse_counterfact_records,
    parse_zsre_records,
)
