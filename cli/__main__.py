from custody_cli.main import main

main()
