module tenkiagentd

go 1.19
